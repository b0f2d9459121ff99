"""Property-based tests of config parsing: whatever a TOML file or a `--set` holds, the result is a config or
a UserError (one line), never another exception; valid values survive the trip through text unchanged."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gtransformer.commands.train import resolve_config
from gtransformer.config import (
    SECRET_MASK,
    apply_overrides,
    from_dict,
    load_toml,
    looks_secret,
    parse_value,
    to_toml,
)
from gtransformer.errors import UserError
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.model.config import ModelConfig
from gtransformer.training.config import SECTIONS, DataConfig, TrainConfig, check_tables

PROPERTIES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

FIELDS = {section: [f.name for f in dataclasses.fields(cls)] for section, cls in SECTIONS.items()}
KEYS = [(section, name) for section, names in FIELDS.items() for name in names]

# TOML's own values: what tomllib can return for a key.
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | int64 | st.integers() | st.floats() | st.text(max_size=20)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
names = st.sampled_from(sorted({n for ns in FIELDS.values() for n in ns} | {"lrr", "pth", "trian", "x"})) | st.text(max_size=10)
section_names = st.sampled_from(["model", "train", "data", "trian", "mdoel", ""]) | st.text(max_size=8)


def only_user_errors(function, *args):
    """function(*args), where a UserError is a fine answer: one line naming what is wrong."""
    try:
        return function(*args)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return None


@PROPERTIES
@given(tables=st.dictionaries(section_names, st.dictionaries(names, anything, max_size=6) | anything, max_size=4))
def test_any_tables_give_a_config_or_a_user_error(tables):
    """Whatever nested values a TOML file holds (wrong types, NaN, huge ints, lists of dicts), only UserError."""
    only_user_errors(check_tables, tables)


@PROPERTIES
@given(section=st.sampled_from(list(SECTIONS)), values=st.dictionaries(names, anything, max_size=8))
def test_any_values_of_a_table_give_a_dataclass_or_a_user_error(section, values):
    result = only_user_errors(from_dict, SECTIONS[section], values, section)
    if result is not None:  # what was accepted has the field's type, finite where it is a number
        for field in dataclasses.fields(result):
            value = getattr(result, field.name)
            assert not isinstance(value, float) or math.isfinite(value), (field.name, value)


@PROPERTIES
@given(key=st.sampled_from(KEYS), text=st.text(max_size=40))
def test_any_set_text_gives_a_config_or_a_user_error(key, text, tiny_tables):
    section, name = key
    tables = tiny_tables(Path("/nonexistent/corpus"))
    only_user_errors(lambda: check_tables(apply_overrides(tables, [f"{section}.{name}={text}"])))


@PROPERTIES
@given(items=st.lists(st.text(max_size=30), max_size=3))
def test_any_set_arguments_through_the_train_command_give_tables_or_a_user_error(items, tmp_path_factory, tiny_tables):
    """`train --set ...` with arbitrary text (no '=', dots, quotes, brackets, newlines): tables or one line."""
    root = tmp_path_factory.getbasetemp() / "set-properties"
    root.mkdir(exist_ok=True)
    config = root / "tiny.toml"
    if not config.exists():
        config.write_text(to_toml(tiny_tables(root / "corpus")), encoding="utf-8")
    args = argparse.Namespace(out=str(root / "run"), resume=False, config=str(config), set=items, max_steps=None,
                              max_minutes=None, data=None, stop_at_step=None, threads=None)
    resolved = only_user_errors(resolve_config, args)
    if resolved is not None:  # checked whole: the tables it resolves to pass the checks again
        check_tables(resolved.tables())
    assert not (root / "run").exists()


def literal(value) -> str:
    """`value` written as to_toml writes it (the text a user would pass to --set)."""
    line = to_toml({"t": {"v": value}}).split("\n")[1]
    return line.partition(" = ")[2]


def valid_values(annotation):
    """A strategy of valid values for a field's annotation (types only; ranges are the dataclass's)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if args and type(None) in args:
        return st.none() | valid_values(next(a for a in args if a is not type(None)))
    if origin in (typing.Union, types.UnionType):  # bool | str (train.compile): any member's values
        return st.one_of(*(valid_values(a) for a in args))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return int64
    if annotation is float:
        return finite
    if annotation is str:
        return st.text(max_size=30)
    if origin is list:
        return st.lists(valid_values(args[0]), max_size=4)
    raise AssertionError(annotation)


@PROPERTIES
@given(data=st.data())
def test_valid_set_values_round_trip(data):
    """Every field's valid values, written as --set text, parse back to the same value of the same type."""
    section, name = data.draw(st.sampled_from(KEYS))
    annotation = typing.get_type_hints(SECTIONS[section])[name]
    value = data.draw(valid_values(annotation))
    assume(value is not None)  # None is "leave the key out": there is no TOML literal for it
    parsed = parse_value(literal(value))
    assert parsed == value and type(parsed) is type(value)
    tables = apply_overrides({}, [f"{section}.{name}={literal(value)}"])
    assert tables == {section: {name: value}}


toml_keys = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
toml_values = st.booleans() | int64 | finite | st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=3) \
    | st.lists(int64, max_size=3)


@PROPERTIES
@given(tables=st.dictionaries(toml_keys, st.dictionaries(toml_keys, toml_values, max_size=6), max_size=4))
def test_to_toml_round_trips_through_load_toml(tables, tmp_path_factory):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_text(to_toml(tables), encoding="utf-8")
    expected = {section: {k: SECRET_MASK if looks_secret(k) else v for k, v in table.items()}
                for section, table in tables.items()}
    assert load_toml(path) == expected


@PROPERTIES
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_loads_as_toml_or_is_a_user_error(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_bytes(content)
    loaded = only_user_errors(load_toml, path)
    if loaded is not None:
        only_user_errors(check_tables, loaded)


@PROPERTIES
@given(text=st.text(max_size=60))
def test_parse_value_never_raises(text):
    """A TOML literal gives its value; anything else is kept as the bare string (later type-checked)."""
    try:
        expected = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        expected = text
    assert parse_value(text) == expected or expected != expected  # (nan != nan)


numbers = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)


@PROPERTIES
@given(max_new_tokens=numbers, temperature=numbers, top_k=numbers, top_p=numbers, repetition_penalty=numbers,
       seed=numbers, stop=st.lists(st.text(max_size=3), max_size=2))
def test_sampling_rules_answer_any_values_with_a_line(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                                     seed, stop):
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop))
    found = config.problem()
    if found is None:  # then every value is in range and finite
        assert math.isfinite(config.temperature) and config.temperature >= 0
        assert config.seed is None or 0 <= config.seed < 2**63
        assert math.isfinite(config.repetition_penalty) and config.repetition_penalty > 0
    else:
        with pytest.raises(UserError) as exc:
            config.validate()
        assert str(exc.value) == found[1] and "\n" not in found[1]


def test_every_field_of_the_config_tables_is_checked():
    """A new TrainConfig / ModelConfig field gets the type checks without more code (coerce_fields)."""
    for cls in (TrainConfig, ModelConfig, DataConfig):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            valid_values(hints[field.name])  # a type this file (and config._coerce) knows
        assert cls() is not None  # the defaults are valid
