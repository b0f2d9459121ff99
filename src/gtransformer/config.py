"""TOML config files, `--set section.key=value` overrides, and dataclass loading.

Every preset in `configs/` is a TOML file with `[model]` and `[train]` tables.
A run saves its fully resolved config next to its checkpoints, so a run folder
alone is enough to rebuild the model.

Every value read here is checked before anything runs: unknown sections and keys are refused with the
nearest valid name (`unknown key train.lrr; did you mean train.lr?`), each value must have its field's
type (an int is not a list, a string is not a number, NaN and infinity are not numbers), and the
dataclasses check their ranges in `__post_init__` (`ModelConfig.validate`, `TrainConfig.validate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gtransformer.errors import UserError

INT64 = 2**63  # TOML integers are 64-bit; torch and numpy overflow beyond
SECRET_MASK = "***"
# A key is secret-looking when one of its words is one of these (`wandb_api_key`, `hf_token`, `password`);
# `eval_tokens` or `sample_top_k` are not.
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"config file {path} {what}; pass a TOML file such as configs/tiny.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror or exc}); check its permissions") from None


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (1, 0.5, true, "x", [1, 2]); fall back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict (in place, also returned)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        parts = [part.strip() for part in key.strip().split(".")]
        if not sep or len(parts) < 2 or not all(parts):
            raise UserError(f"--set {item!r} is not of the form section.key=value, e.g. --set train.lr=3e-4")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = parse_value(value.strip())
    return config


def shown_name(name: str) -> str:
    """A name as an error line shows it: as is when printable, else quoted with escapes (a key "a\nb")."""
    return name if name.isprintable() and name.strip() == name and name else repr(name)


def did_you_mean(name: str, valid: Iterable[str], prefix: str = "", suffix: str = "") -> str:
    """'; did you mean PREFIX<closest>SUFFIX?' for the valid name nearest to `name`, or '' when none is near."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}{suffix}?" if close else ""


def check_names(given: Iterable[str], valid: Iterable[str], what: str, prefix: str = "", suffix: str = "") -> None:
    """Refuse names outside `valid` in one line: the first unknown one with the nearest valid name.

    `what` is "key" or "section"; every name is shown as PREFIX name SUFFIX ("train.lr", "[train]")."""
    valid = sorted(valid)
    unknown = sorted(shown_name(str(name)) for name in given if name not in valid)
    if not unknown:
        return
    first = unknown[0]
    others = f" (and {', '.join(prefix + u + suffix for u in unknown[1:])})" if len(unknown) > 1 else ""
    hint = did_you_mean(first, valid, prefix, suffix) or f"; valid {what}s: {', '.join(prefix + v + suffix for v in valid)}"
    raise UserError(f"unknown {what} {prefix}{first}{suffix}{others}{hint}")


def _type_error(name: str, value: Any, expected: str) -> UserError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return UserError(f"{name} = {shown} must be {expected}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """`value` as a value of `annotation` (TOML ints fill float fields), or a UserError naming `name`.

    Numbers must be finite and fit in 64 bits; bools are not numbers; lists must be lists (of the item type)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except UserError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise _type_error(name, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, value, "an integer")
        if not -INT64 <= value < INT64:
            raise _type_error(name, value, "an integer that fits in 64 bits")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, value, "a number")
        try:
            number = float(value)
        except OverflowError:
            raise _type_error(name, value, "a number that fits in a float") from None
        if not math.isfinite(number):
            raise _type_error(name, value, "a finite number")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise _type_error(name, value, 'a string (in quotes: "...")')
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _type_error(name, value, "valid Unicode text") from None
        return value
    if annotation in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(name, value, "a list, e.g. [...]")
        item = args[0] if args and args[0] is not Ellipsis else Any
        items = [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or annotation) is tuple else items
    return value


def coerce_fields(instance: Any, section: str) -> None:
    """Check (and coerce in place) every field of a dataclass instance against its annotation."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        coerced = _coerce(value, hints[field.name], f"{section}.{field.name}")
        if coerced is not value:
            setattr(instance, field.name, coerced)


def checks_itself(cls: type) -> bool:
    """Whether dataclass `cls` checks its own values when built: a config class with a `validate` method, whose
    `__post_init__` runs `coerce_fields` (types) and then `validate` (ranges), as ModelConfig and TrainConfig do."""
    return callable(getattr(cls, "validate", None))


def from_dict(cls: type, values: Any, section: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys (with the nearest valid one) and wrong types.

    Each value is coerced once: by `cls` itself when it `checks_itself`, else here."""
    if not isinstance(values, dict):
        raise UserError(f"[{section}] must be a table of key = value lines, not {type(values).__name__} {values!r}"[:200])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_names(values, fields, "key", f"{section}.")
    if checks_itself(cls):
        return cls(**values)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def looks_secret(key: str) -> bool:
    """Whether a config key names a secret: one of its words is key, token, secret, password, ..."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower())
    return any(word in SECRET_WORDS for word in words)


def mask_secrets(value: Any) -> Any:
    """A copy of nested dicts / lists with the value of every secret-looking key replaced by SECRET_MASK."""
    if isinstance(value, dict):
        return {k: SECRET_MASK if looks_secret(k) and v is not None else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v) for v in value]
    return value


def _escape(ch: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and unprintable characters escaped."""
    if ch in '"\\':
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch.isprintable():
        return ch
    return f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write a two-level dict of scalars/lists as TOML (enough for our configs; None is omitted).

    The value of any key that looks like a secret (`looks_secret`: key, token, secret, password) is written
    as SECRET_MASK: a run folder never holds a credential (those come from the environment)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return '"' + "".join(_escape(ch) for ch in value) + '"'
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        raise TypeError(f"cannot write {value!r} to TOML")

    lines: list[str] = []
    for section, table in mask_secrets(tables).items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {fmt(value)}")
        lines.append("")
    return "\n".join(lines)
