"""Untrusted files and secrets.

No code path unpickles what it reads: a pickle whose `__reduce__` would create a marker file is planted
wherever the package loads state (checkpoint state, weights, metadata, tokenizer, chat template, prepared
shards, a Hugging Face folder) and every loader refuses it without running it; the source never calls a
pickle loader. No secret reaches code, configs, logs or run folders: W&B and API keys come from the
environment only, config.toml masks secret-looking keys, and the config tables have none to begin with.
"""

from __future__ import annotations

import ast
import builtins
import io
import logging
import pickle
import re
import socket
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from gtransformer.cli import main
from gtransformer.config import SECRET_MASK, load_toml, looks_secret, mask_secrets, to_toml
from gtransformer.data.corpus import PreparedCorpus
from gtransformer.errors import UserError
from gtransformer.inference.chat import ChatTemplate
from gtransformer.interop.hf import import_hf
from gtransformer.training import checkpoint as ckpt
from gtransformer.training.config import SECTIONS, check_tables
from gtransformer.training.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "gtransformer"

pytestmark = [pytest.mark.usefixtures("one_thread")]


class Planted:
    """Unpickling this runs `exec`, which creates the marker file: proof that a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def payloads(marker: Path) -> dict[str, bytes]:
    """The same attack in both forms a .pt file takes: a raw pickle, and torch.save's zip archive."""
    buffer = io.BytesIO()
    torch.save({"optimizer": Planted(marker)}, buffer)
    return {"pickle": pickle.dumps({"optimizer": Planted(marker)}, protocol=2), "torch.save": buffer.getvalue()}


def test_the_planted_pickle_does_run_when_unpickled(tmp_path):
    """The control: the payload is live, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    pickle.loads(payloads(marker)["pickle"])
    assert marker.exists()
    marker.unlink()
    with zipfile.ZipFile(io.BytesIO(payloads(marker)["torch.save"])) as archive:
        (data,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        pickle.loads(archive.read(data))
    assert marker.exists()


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_checkpoint_state_with_a_planted_pickle_is_refused_unexecuted(form, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = ckpt.save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, {"x": torch.tensor(1)}, {})
    checkpoint.state_path.write_bytes(payloads(marker)[form])
    with pytest.raises((pickle.UnpicklingError, UserError)):
        ckpt.load_train_state(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_resuming_a_run_with_a_planted_state_never_runs_it(form, tmp_path, make_corpus, tiny_tables, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny_tables(corpus, max_steps=1)), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(corpus), "--out", str(out), "--no-progress"]) == 0
    marker = tmp_path / "pwned"
    RunDir(out).latest_checkpoint().state_path.write_bytes(payloads(marker)[form])
    try:
        code = main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--no-progress"])
    except pickle.UnpicklingError:  # refused; turning it into one line is the checkpoint loader's business
        code = None
    assert code != 0
    assert not marker.exists()


# Every other file a command loads, replaced by the planted pickle, and the loader that reads it: none unpickles.
RUN_FILES = {
    "checkpoints/step-0000001/model.safetensors": ckpt.load_for_inference,
    "checkpoints/step-0000001/meta.json": ckpt.load_for_inference,
    "tokenizer.json": ckpt.load_for_inference,
    "chat_template.json": lambda run: ChatTemplate.load(run / "chat_template.json"),
}


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_files_with_a_planted_pickle_are_refused_unexecuted(name, tmp_path, make_run):
    run = make_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    (run / name).write_bytes(payloads(marker)["pickle"])
    with pytest.raises(Exception):
        RUN_FILES[name](run)
    assert not marker.exists()


CORPUS_FILES = {
    "train.bin": lambda corpus: corpus.tokens("train"),
    "stats.json": lambda corpus: corpus.stats(),
    "tokenizer.json": lambda corpus: corpus.tokenizer(),
}


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_a_prepared_corpus_with_a_planted_pickle_is_refused_unexecuted(name, tmp_path, make_corpus):
    corpus = make_corpus(tmp_path / "corpus")
    marker = tmp_path / "pwned"
    (corpus / name).write_bytes(payloads(marker)["pickle"])
    with pytest.raises(Exception):
        CORPUS_FILES[name](PreparedCorpus(corpus))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_hugging_face_folder_with_a_planted_pickle_is_refused_unexecuted(name, tmp_path, make_run, capsys):
    run = make_run(tmp_path / "run")
    folder = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(folder)]) == 0
    marker = tmp_path / "pwned"
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / name).write_bytes(payloads(marker)["torch.save"])
    with pytest.raises(Exception):
        import_hf(folder)
    assert not marker.exists()


PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def source_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")])


def pickle_loader_calls(source: str, label: str) -> list[str]:
    """Where `source` may unpickle: torch.load without weights_only=True, a pickle-family module, numpy's
    allow_pickle, yaml.load, eval or exec."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        where = f"{label}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            problems.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") or name.endswith("serialization.load"):
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"{where} calls {name} without weights_only=True")
            if name in ("np.load", "numpy.load"):
                allow = keywords.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append(f"{where} calls {name} with allow_pickle")
            if name in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{where} calls {name}")
    return problems


def test_the_source_never_calls_a_pickle_loader():
    unsafe = ("import pickle\nfrom joblib import load\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
              "np.load(p, allow_pickle=True)\neval(text)\n")
    assert len(pickle_loader_calls(unsafe, "sample")) == 6  # the scan sees each form
    assert pickle_loader_calls("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n", "ok") == []
    problems = [p for path in source_files()
                for p in pickle_loader_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not problems, problems


# --- secrets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, secret", [
    ("api_key", True), ("wandb_api_key", True), ("hf_token", True), ("token", True), ("secret", True),
    ("password", True), ("apiKey", True), ("db-password", True), ("OPENAI_API_KEY", True),
    ("eval_tokens", False), ("sample_tokens", False), ("max_tokens", False), ("sample_top_k", False),
    ("keep_last", False), ("tokenizer", False), ("path", False), ("keys_seen", False),
])
def test_secret_looking_keys(key, secret):
    assert looks_secret(key) is secret


def test_config_toml_masks_secret_looking_keys(tmp_path):
    tables = {"data": {"path": "/data", "hf_token": "hf_abcdefghijklmnopqrstuvwxyz0123"},
              "train": {"lr": 1e-3, "wandb_api_key": "0123456789abcdef0123456789abcdef01234567"}}
    RunDir(tmp_path).write_config(tables)
    text = (tmp_path / "config.toml").read_text(encoding="utf-8")
    assert "hf_abcdef" not in text and "0123456789abcdef" not in text
    assert RunDir(tmp_path).read_config() == {"data": {"path": "/data", "hf_token": SECRET_MASK},
                                              "train": {"lr": 1e-3, "wandb_api_key": SECRET_MASK}}
    assert mask_secrets(tables)["train"]["lr"] == 1e-3 and tables["data"]["hf_token"].startswith("hf_")


def test_no_config_key_looks_like_a_secret():
    """The resolved tables a run writes (config.toml, meta.json, W&B's config) hold only these keys (any other is
    refused before training), so none of them can carry a credential."""
    for section, cls in SECTIONS.items():
        for field in cls.__dataclass_fields__:
            assert not looks_secret(field), f"{section}.{field} looks like a secret: read it from the environment"


def test_a_secret_given_as_a_config_key_is_refused_without_echoing_it(tmp_path, capsys, make_corpus, tiny_tables):
    corpus = make_corpus(tmp_path / "corpus")
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny_tables(corpus, max_steps=1)), encoding="utf-8")
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--set", 'train.wandb_api_key="sekrit-value-123"'])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key train.wandb_api_key" in err and "sekrit" not in err
    assert not (tmp_path / "run").exists()


class FakeWandb(types.ModuleType):
    """Stands in for wandb (not installed here): records what the trainer hands it."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.rows = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda row, step: self.rows.append(row), finish=lambda: None)


def test_training_writes_no_secret_from_the_environment(tmp_path, monkeypatch, caplog, capsys, make_corpus,
                                                        tiny_tables):
    secret = "wandb-0123456789abcdef-not-a-real-key"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", "hf_" + secret)
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    corpus = make_corpus(tmp_path / "corpus")
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny_tables(corpus, max_steps=2, wandb=True, sample_prompts=["Era"], eval_every=1,
                                          checkpoint_every=1)), encoding="utf-8")
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        assert main(["train", "--config", str(config), "--data", str(corpus), "--out", str(out), "--no-progress"]) == 0
    assert wandb.inits and wandb.rows  # W&B was used, its key taken from the environment by wandb itself
    assert secret not in repr(wandb.inits)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.toml" for p in written) and any(p.name == "meta.json" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert secret not in caplog.text + captured.out + captured.err


def test_serve_never_prints_its_api_key(tmp_path, monkeypatch, capsys, make_run):
    """The key's variable is named on the command line; the key itself shows in no error line (the running
    server's logs are checked by tests/test_serve.py)."""
    secret = "serve-key-0123456789-not-real"
    monkeypatch.setenv("GT_SAFETY_KEY", secret)
    run = make_run(tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        assert main(["serve", str(run), "--api-key-env", "GT_SAFETY_KEY", "--port", port]) == 2
    captured = capsys.readouterr()
    assert "already in use" in captured.err and secret not in captured.err + captured.out
    monkeypatch.setenv("GT_SAFETY_KEY", "")
    assert main(["serve", str(run), "--api-key-env", "GT_SAFETY_KEY", "--port", "0"]) == 2
    assert "GT_SAFETY_KEY" in capsys.readouterr().err


# Credentials in the forms providers issue them; none may sit in what the repository ships.
TOKEN_PATTERNS = re.compile(
    r"sk-[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{30,}|ghp_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,}"
    r"|AKIA[0-9A-Z]{16}|xox[baprs]-[A-Za-z0-9-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|(?i:(?:api[_-]?key|token|secret|password)\s*[=:]\s*[\"'][A-Za-z0-9+/_-]{16,}[\"'])"
)


def test_no_credential_in_code_configs_docs_or_notebooks():
    roots = [REPO / name for name in ("src", "configs", "docs", "notebooks", "scripts", "benchmarks")]
    files = [p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()]
    files += [p for p in REPO.glob("*") if p.is_file()]
    found = []
    for path in files:
        if path.suffix in (".png", ".jpg", ".gif", ".ico", ".pt", ".bin", ".safetensors") or path.stat().st_size > 5e6:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        found += [f"{path.relative_to(REPO)}: {m.group(0)[:12]}..." for m in TOKEN_PATTERNS.finditer(text)]
    assert not found, found


def test_presets_pass_the_whole_config_check(tmp_path):
    """The shipped configs are valid as a whole (sections, keys, types, ranges) and hold no secret-looking key."""
    presets = sorted((REPO / "configs").glob("*.toml"))
    assert presets
    for preset in presets:
        tables = {**load_toml(preset), "data": {"path": str(tmp_path)}}
        check_tables(tables)
        assert mask_secrets(tables) == tables, preset
