"""TOML config files, `--set section.key=value` overrides, and dataclass loading.

Every preset in `configs/` is a TOML file with `[model]` and `[train]` tables.
A run saves its fully resolved config next to its checkpoints, so a run folder
alone is enough to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from gtransformer.errors import UserError


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass a TOML file such as configs/tiny.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (1, 0.5, true, "x", [1, 2]); fall back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict (in place, also returned)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise UserError(f"--set {item!r} is not of the form section.key=value, e.g. --set train.lr=3e-4")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = parse_value(value.strip())
    return config


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Light type coercion so TOML ints can fill float fields and ints stay ints."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except UserError:
                continue
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise UserError(f"config value {name} = {value!r} should be of type {annotation.__name__}")
    if annotation is int and isinstance(value, bool):
        raise UserError(f"config value {name} = {value!r} should be an integer")
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return origin(value) if origin is list else tuple(value)
    return value


def from_dict(cls: type, values: dict[str, Any], section: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with a clear message."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(
            f"unknown key(s) {', '.join(unknown)} in [{section}]; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write a two-level dict of scalars/lists as TOML (enough for our configs; None is omitted)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        raise TypeError(f"cannot write {value!r} to TOML")

    lines: list[str] = []
    for section, table in tables.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {fmt(value)}")
        lines.append("")
    return "\n".join(lines)
