import dataclasses

import pytest

from gtransformer.config import apply_overrides, from_dict, load_toml, parse_value, to_toml
from gtransformer.errors import UserError


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
