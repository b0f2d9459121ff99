import dataclasses

import pytest

from gtransformer.config import SECRET_MASK, apply_overrides, from_dict, load_toml, parse_value, to_toml
from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.training.config import TrainConfig, check_tables


@dataclasses.dataclass
class Example:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    flag: bool = False
    head_dim: int | None = None


def test_parse_value_uses_toml_literals():
    assert parse_value("3") == 3
    assert parse_value("3e-4") == 3e-4
    assert parse_value("true") is True
    assert parse_value('"a b"') == "a b"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("cosine") == "cosine"  # bare words stay strings


def test_apply_overrides_nested():
    cfg = {"train": {"lr": 1.0}}
    apply_overrides(cfg, ["train.lr=0.5", "model.n_layers=2"])
    assert cfg == {"train": {"lr": 0.5}, "model": {"n_layers": 2}}


@pytest.mark.parametrize("bad", ["lr=1", "train.lr", ".lr=1", "train.=1"])
def test_apply_overrides_rejects_malformed(bad):
    with pytest.raises(UserError, match="section.key=value"):
        apply_overrides({}, [bad])


def test_from_dict_coerces_and_rejects_unknown():
    ex = from_dict(Example, {"lr": 1, "steps": 5, "head_dim": 32}, "train")
    assert ex.lr == 1.0 and isinstance(ex.lr, float) and ex.steps == 5 and ex.head_dim == 32
    with pytest.raises(UserError, match="unknown key.*bogus"):
        from_dict(Example, {"bogus": 1}, "train")
    with pytest.raises(UserError, match="train.steps"):
        from_dict(Example, {"steps": "many"}, "train")
    with pytest.raises(UserError, match="integer"):
        from_dict(Example, {"steps": True}, "train")


def test_toml_round_trip(tmp_path):
    tables = {"model": {"d_model": 64, "rope_theta": 10000.0, "qk_norm": False, "name": 'a "q"'},
              "train": {"prompts": ["Era uma vez", "O amor"], "skip": None}}
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tables))
    loaded = load_toml(path)
    assert loaded["model"] == tables["model"]
    assert loaded["train"] == {"prompts": ["Era uma vez", "O amor"]}


def test_load_toml_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(bad)


def test_unknown_names_get_the_nearest_valid_one():
    with pytest.raises(UserError, match=r"^unknown key train\.lrr; did you mean train\.lr\?$"):
        from_dict(Example, {"lrr": 1}, "train")
    with pytest.raises(UserError, match=r"unknown key train\.zzz; valid keys: train\.flag, train\.head_dim"):
        from_dict(Example, {"zzz": 1}, "train")
    with pytest.raises(UserError, match=r"unknown key train\.lrr \(and train\.stpes\); did you mean train\.lr\?"):
        from_dict(Example, {"lrr": 1, "stpes": 2}, "train")
    with pytest.raises(UserError, match=r"^unknown section \[trian\]; did you mean \[train\]\?$"):
        check_tables({"trian": {"lr": 1.0}})
    with pytest.raises(UserError, match=r"lr = 0\.1 sits outside any table; put it under \[train\]"):
        check_tables({"lr": 0.1})
    with pytest.raises(UserError, match=r"unknown key train\.'a\\nb';"):  # an odd name is quoted: the error stays one line
        from_dict(Example, {"a\nb": 1}, "train")


@pytest.mark.parametrize("field, value, words", [
    ("lr", "fast", "train.lr = 'fast' must be a number"),
    ("lr", True, "train.lr = True must be a number"),
    ("lr", float("nan"), "train.lr = nan must be a finite number"),
    ("lr", float("-inf"), "train.lr = -inf must be a finite number"),
    ("lr", 10**400, "must be a number that fits in a float"),
    ("steps", 2.0, "train.steps = 2.0 must be an integer"),
    ("steps", 2**63, "must be an integer that fits in 64 bits"),
    ("flag", 1, "train.flag = 1 must be true or false"),
    ("name", 3, "train.name = 3 must be a string"),
    ("head_dim", "wide", "train.head_dim = 'wide' must be an integer"),
    ("prompts", "Era uma vez", "train.prompts = 'Era uma vez' must be a list"),
    ("prompts", 3, "train.prompts = 3 must be a list"),
    ("prompts", ["a", 2], "train.prompts[1] = 2 must be a string"),
])
def test_from_dict_names_the_key_of_a_wrong_type(field, value, words):
    with pytest.raises(UserError) as exc:
        from_dict(Listed, {field: value}, "train")
    assert words in str(exc.value)


@dataclasses.dataclass
class Listed(Example):
    prompts: list[str] = dataclasses.field(default_factory=list)


def test_dataclasses_check_types_and_ranges_when_built_directly():
    with pytest.raises(UserError, match="train.batch_size = 0 must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="train.sample_prompts = 3 must be a list"):
        TrainConfig(sample_prompts=3)
    with pytest.raises(UserError, match="model.rope_theta = inf must be a finite number"):
        ModelConfig(rope_theta=float("inf"))
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)  # ints fill floats


def test_check_tables_returns_the_three_tables():
    model, train, data = check_tables({"model": {"d_model": 64}, "train": {"lr": 1}, "data": {"path": "/x"}})
    assert (model.d_model, train.lr, data.path) == (64, 1.0, "/x")
    with pytest.raises(UserError, match=r"^\[train\] must be a table"):
        check_tables({"train": 5})
    with pytest.raises(UserError, match="unknown key data.pth; did you mean data.path"):
        check_tables({"data": {"pth": "/x"}})


def test_to_toml_masks_secrets_and_escapes_control_characters(tmp_path):
    tables = {"data": {"path": "a\tb\x00c\u2028\U0001f600", "api_key": "abc123"}}
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tables), encoding="utf-8")
    assert "abc123" not in path.read_text(encoding="utf-8")
    assert load_toml(path) == {"data": {"path": "a\tb\x00c\u2028\U0001f600", "api_key": SECRET_MASK}}


def test_load_toml_refuses_folders_and_non_utf8(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a file"):
        load_toml(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[data]\npath = "Informação"\n'.encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_toml(latin)
