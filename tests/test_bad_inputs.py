"""Every bad input a user can give any command is one line on stderr (`gtransformer CMD: error: ...`), exit
code 2, no traceback, and nothing written: a table of (argv, words of the error) run in-process through
`cli.main`, and the HTTP API's answer to absurd sampling values."""

from __future__ import annotations

import json
import os
import shutil
import socket
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from gtransformer.cli import main
from gtransformer.config import to_toml
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.inference import chat
from gtransformer.inference.engine import Engine
from gtransformer.serving.app import create_app
from gtransformer.serving.protocol import APIError, CompletionRequest
from gtransformer.serving.service import ServerSettings
from gtransformer.training.run_dir import RunDir

pytestmark = [pytest.mark.usefixtures("one_thread")]

LONG_PROMPT = "Era uma vez uma casa na cidade. " * 80  # far over the 128-token context of the test run


def edit_meta(run: Path, change) -> Path:
    checkpoint = RunDir(run).latest_checkpoint()
    meta = checkpoint.read_meta()
    change(meta)
    checkpoint.write_meta(meta)
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_run, make_corpus, tiny_tables) -> SimpleNamespace:
    """Valid inputs to spoil one at a time: a corpus, a run, a config, files and folders of the wrong kind."""
    root = tmp_path_factory.mktemp("bad-inputs")
    corpus = make_corpus(root / "corpus")
    run = make_run(root / "run", context_length=128)
    config = root / "tiny.toml"
    config.write_text(to_toml(tiny_tables(corpus, max_steps=1)), encoding="utf-8")
    (root / "empty").mkdir()
    (root / "raw").mkdir()
    (root / "raw" / "1.txt").write_text("Era uma vez.", encoding="utf-8")
    (root / "latin1.txt").write_bytes("Informação".encode("latin-1"))
    (root / "blank.txt").write_text("  \n", encoding="utf-8")
    (root / "not.toml").write_text("[model\nd_model = ", encoding="utf-8")
    (root / "value-section.toml").write_text("train = 5\n", encoding="utf-8")
    (root / "top-level.toml").write_text("lr = 0.1\n[train]\nbatch_size = 8\n", encoding="utf-8")
    (root / "list.toml").write_text('[train]\nsample_prompts = "Era uma vez"\n', encoding="utf-8")
    (root / "nan.toml").write_text("[train]\nlr = nan\n", encoding="utf-8")
    # Checkpoints that this version cannot read: a [model] key from elsewhere, a value of the wrong type.
    edit_meta(shutil.copytree(run, root / "future"), lambda m: m["config"]["model"].update(moe_layers=3))
    edit_meta(shutil.copytree(run, root / "wrongtype"), lambda m: m["config"]["model"].update(d_model="32"))
    edit_meta(shutil.copytree(run, root / "badmodel"), lambda m: m["config"]["model"].update(n_kv_heads=3))
    no_tokenizer = shutil.copytree(run, root / "notokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    yield SimpleNamespace(root=root, corpus=corpus, run=run, config=config, busy=busy,
                          port=busy.getsockname()[1])
    busy.close()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    except BaseException:  # a traceback: the failure this file exists to catch
        pytest.fail(f"{argv} raised instead of a one-line error:\n{traceback.format_exc()}")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TRAIN = ["train", "--config", "{config}", "--data", "{corpus}", "--out", "{out}", "--no-progress"]
GENERATE = ["generate", "{run}", "--prompt", "Era uma vez", "--max-new-tokens", "4", "--device", "cpu"]

CASES = [
    # --- download ---
    (["download", "--timeout", "abc", "--out", "{out}"], "invalid float value: 'abc'"),
    (["download", "--timeout", "0", "--out", "{out}"], "--timeout 0.0 must be > 0"),
    (["download", "--timeout", "nan", "--out", "{out}"], "--timeout nan: must be a finite number"),
    (["download", "--retries", "-1", "--out", "{out}"], "--retries -1 must not be negative"),
    (["download", "--delay", "-2", "--out", "{out}"], "--delay -2.0 must not be negative"),
    (["download", "--limit", "0", "--out", "{out}"], "--limit 0 must be at least 1"),
    (["download", "--ids", "2837;abc", "--out", "{out}"], "expected positive book ids"),
    (["download", "--ids", "", "--out", "{out}"], "expected positive book ids"),
    (["download", "--ids=-3", "--out", "{out}"], "expected positive book ids"),
    (["download", "--language", "", "--out", "{out}"], "--language needs a catalog language code"),
    (["download", "--mirror", "{root}/nowhere", "--out", "{out}"], "neither an http(s) URL nor an existing folder"),
    (["download", "--mirror", "{root}/raw/1.txt", "--out", "{out}"], "neither an http(s) URL nor an existing folder"),
    (["download", "--mirror", "ftp://example.org", "--out", "{out}"], "neither an http(s) URL"),
    (["download", "--out", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
    # --- prepare ---
    (["prepare", "--raw", "{root}/nowhere", "--out", "{out}"], "does not exist; run `gtransformer download"),
    (["prepare", "--raw", "{root}/raw/1.txt", "--out", "{out}"], "--raw {root}/raw/1.txt is a file"),
    (["prepare", "--raw", "{root}/raw", "--out", "{root}/raw/1.txt"], "--out {root}/raw/1.txt is a file"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--split", "90/10"], "expected three non-negative ratios"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--split", "0/5/5"], "train > 0"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--split", "nan/5/5"], "expected three non-negative"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--vocab-size", "0"], "--vocab-size 0 is too small"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--vocab-size", "many"], "invalid int value: 'many'"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--min-portuguese", "2"], "--min-portuguese 2.0"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--workers", "0"], "--workers 0 must be at least 1"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--min-words", "-1"], "--min-words -1"),
    (["prepare", "--raw", "{root}/raw", "--out", "{out}", "--tokenizer-sample-mb", "inf"], "must be a finite"),
    # --- train: the config file ---
    (["train", "--out", "{out}", "--data", "{corpus}"], "pass --config"),
    (["train", "--config", "{root}/nowhere.toml", "--data", "{corpus}", "--out", "{out}"], "nowhere.toml not found"),
    (["train", "--config", "{root}/empty", "--data", "{corpus}", "--out", "{out}"], "is a folder, not a file"),
    (["train", "--config", "{root}/not.toml", "--data", "{corpus}", "--out", "{out}"], "is not valid TOML"),
    (["train", "--config", "{root}/latin1.txt", "--data", "{corpus}", "--out", "{out}"], "is not UTF-8 text"),
    (["train", "--config", "{root}/value-section.toml", "--data", "{corpus}", "--out", "{out}"],
     "[train] must be a table"),
    (["train", "--config", "{root}/top-level.toml", "--data", "{corpus}", "--out", "{out}"], "lr = 0.1 sits outside any table; put it under [train]"),
    (["train", "--config", "{root}/list.toml", "--data", "{corpus}", "--out", "{out}"],
     "train.sample_prompts = 'Era uma vez' must be a list"),
    (["train", "--config", "{root}/nan.toml", "--data", "{corpus}", "--out", "{out}"],
     "train.lr = nan must be a finite number"),
    # --- train: --set forms, unknown names (with the nearest valid one), types ---
    (TRAIN + ["--set", "lr=1e-3"], "is not of the form section.key=value"),
    (TRAIN + ["--set", "train.lr"], "is not of the form section.key=value"),
    (TRAIN + ["--set", "train..lr=1"], "is not of the form section.key=value"),
    (TRAIN + ["--set", "train.lr.x=1"], "'lr' is a value, not a section"),
    (TRAIN + ["--set", "trian.lr=1e-3"], "unknown section [trian]; did you mean [train]?"),
    (TRAIN + ["--set", "train.lrr=1e-3"], "unknown key train.lrr; did you mean train.lr?"),
    (TRAIN + ["--set", "data.pth=x"], "unknown key data.pth; did you mean data.path?"),
    (TRAIN + ["--set", "model.n_expert=2"], "did you mean model.n_experts?"),
    (TRAIN + ["--set", "train.zzzzzz=1"], "unknown key train.zzzzzz; valid keys: train.batch_size"),
    (TRAIN + ["--set", "train.lr=fast"], "train.lr = 'fast' must be a number"),
    (TRAIN + ["--set", "train.lr=true"], "train.lr = True must be a number"),
    (TRAIN + ["--set", "train.batch_size=8.5"], "train.batch_size = 8.5 must be an integer"),
    (TRAIN + ["--set", "train.compile=1"], "train.compile = 1 must be true or false"),
    (TRAIN + ["--set", "train.sample_prompts=3"], "train.sample_prompts = 3 must be a list"),
    (TRAIN + ["--set", "train.sample_prompts=[1, 2]"], "train.sample_prompts[0] = 1 must be a string"),
    (TRAIN + ["--set", "train.schedule=3"], "train.schedule = 3 must be a string"),
    (TRAIN + ["--set", "model.head_dim=wide"], "model.head_dim = 'wide' must be an integer"),
    (["train", "--config", "{config}", "--out", "{out}", "--set", "data.path=5"], "data.path = 5 must be a string"),
    (TRAIN + ["--set", "train.seed=99999999999999999999"], "must be an integer that fits in 64 bits"),
    (TRAIN + ["--set", "train.lr=inf"], "train.lr = inf must be a finite number"),
    (TRAIN + ["--set", "model.rope_theta=nan"], "model.rope_theta = nan must be a finite number"),
    # --- train: ranges ---
    (TRAIN + ["--set", "train.batch_size=0"], "train.batch_size = 0 must be >= 1"),
    (TRAIN + ["--set", "train.micro_batch_size=-1"], "train.micro_batch_size = -1 must be >= 0"),
    (TRAIN + ["--set", "train.micro_batch_size=3"], "must divide train.batch_size = 8"),
    (TRAIN + ["--set", "train.log_every=0"], "train.log_every = 0 must be >= 1"),
    (TRAIN + ["--set", "train.eval_every=-1"], "train.eval_every = -1 must be >= 0"),
    (TRAIN + ["--set", "train.eval_tokens=-1"], "train.eval_tokens = -1 must be >= 0"),
    (TRAIN + ["--set", "train.eval_batch_size=0"], "train.eval_batch_size = 0 must be >= 1"),
    (TRAIN + ["--set", "train.lr=-1e-3"], "train.lr = -0.001 must be > 0"),
    (TRAIN + ["--set", "train.lr=0"], "train.lr = 0.0 must be > 0"),
    (TRAIN + ["--set", "train.beta1=2"], "train.beta1 = 2.0 must lie in [0, 1)"),
    (TRAIN + ["--set", "train.beta2=1"], "train.beta2 = 1.0 must lie in [0, 1)"),
    (TRAIN + ["--set", "train.eps=0"], "train.eps = 0.0 must be > 0"),
    (TRAIN + ["--set", "train.weight_decay=-0.1"], "train.weight_decay = -0.1 must be >= 0"),
    (TRAIN + ["--set", "train.min_lr_ratio=7"], "train.min_lr_ratio = 7.0 must lie in [0, 1]"),
    (TRAIN + ["--set", "train.warmup_steps=-5"], "train.warmup_steps = -5 must be >= 0"),
    (TRAIN + ["--set", "train.decay_fraction=1.5"], "train.decay_fraction = 1.5 must lie in [0, 1]"),
    (TRAIN + ["--set", "train.grad_clip=-1"], "train.grad_clip = -1.0 must be >= 0"),
    (TRAIN + ["--set", "train.max_steps=-1"], "train.max_steps = -1 must be >= 0"),
    (TRAIN + ["--set", "train.max_minutes=-1"], "train.max_minutes = -1.0 must be >= 0"),
    (TRAIN + ["--set", "train.epochs=0"], "train.epochs = 0 must be >= 1"),
    (TRAIN + ["--set", "train.checkpoint_every=-1"], "train.checkpoint_every = -1 must be >= 0"),
    (TRAIN + ["--set", "train.keep_last=-1"], "train.keep_last = -1 must be >= 0"),
    (TRAIN + ["--set", "train.schedule=linear"], "train.schedule = 'linear' must be one of cosine, wsd, constant"),
    (TRAIN + ["--set", "train.precision=fp8"], "train.precision = 'fp8' must be one of auto"),
    (TRAIN + ["--set", "train.seed=-1"], "train.seed = -1 must lie in [0, 2**63)"),
    (TRAIN + ["--set", "train.sample_tokens=-1"], "train.sample_tokens = -1 must be an integer >= 0"),
    (TRAIN + ["--set", "train.sample_temperature=-1"], "train.sample_temperature = -1.0 must be a finite number"),
    (TRAIN + ["--set", "train.sample_top_p=2"], "train.sample_top_p = 2.0 must be a number in (0, 1]"),
    (TRAIN + ["--set", "train.sample_top_k=-1"], "train.sample_top_k = -1 must be an integer >= 0"),
    (TRAIN + ["--set", "train.sample_repetition_penalty=0"], "train.sample_repetition_penalty = 0.0 must be"),
    (TRAIN + ["--set", "train.sample_seed=-1"], "train.sample_seed = -1 must be an integer in [0, 2**63)"),
    (TRAIN + ["--set", 'train.wandb_project=""'], "train.wandb_project = '' must name"),
    (TRAIN + ["--set", "model.d_model=0"], "d_model = 0 must be a positive integer"),
    (TRAIN + ["--set", "model.n_kv_heads=3"], "n_heads = 4 is not a multiple of n_kv_heads = 3"),
    (TRAIN + ["--set", "model.d_model=30"], "d_model = 30 is not divisible by n_heads = 4"),
    (TRAIN + ["--set", "model.top_k=9"], "top_k = 9 must be between 1 and n_experts = 4"),
    (TRAIN + ["--set", "model.balance=fair"], "balance = 'fair' must be"),
    (TRAIN + ["--set", "model.norm_eps=0"], "norm_eps = 0.0 must be positive"),
    (TRAIN + ["--set", "model.vocab_size=100"],
     "add --set model.vocab_size=384 or prepare the corpus with --vocab-size 100"),
    # --- train: flags, data, run folder ---
    (TRAIN + ["--max-steps", "-1"], "--max-steps -1 must be >= 0"),
    (TRAIN + ["--max-minutes", "-1"], "--max-minutes -1.0 must be >= 0"),
    (TRAIN + ["--max-minutes", "nan"], "--max-minutes nan: must be a finite number"),
    (TRAIN + ["--stop-at-step", "-1"], "--stop-at-step -1 must be >= 0"),
    (TRAIN + ["--threads", "0"], "--threads 0 must be >= 1"),
    (TRAIN + ["--threads", "100000000000000"], "use at most"),
    (TRAIN + ["--max-steps", "two"], "invalid int value: 'two'"),
    (TRAIN + ["--max_steps", "2"], "did you mean --max-steps?"),
    (["train", "--config", "{config}", "--data", "{root}/nowhere", "--out", "{out}"], "prepare"),
    (["train", "--config", "{config}", "--data", "{root}/empty", "--out", "{out}"], "prepare"),
    (["train", "--config", "{config}", "--data", "{corpus}", "--out", "{root}/raw/1.txt"], "is a file"),
    (["train", "--config", "{config}", "--data", "{corpus}", "--out", "{run}"], "pass --resume"),
    (["train", "--config", "{config}", "--data", "{corpus}"], "the following arguments are required: --out"),
    # --- eval ---
    (["eval", "{root}/nowhere"], "{root}/nowhere does not exist"),
    (["eval", "{root}/empty"], "has no checkpoints"),
    (["eval", "{root}/future"], "unknown key model.moe_layers"),
    (["eval", "{root}/wrongtype"], "model.d_model = '32' must be an integer"),
    (["eval", "{root}/badmodel"], "not a multiple of n_kv_heads = 3"),
    (["eval", "{root}/notokenizer"], "no tokenizer.json"),
    (["eval", "{run}", "--data", "{root}/nowhere"], "val.bin not found"),
    (["eval", "{run}", "--split", "train"], "invalid choice: 'train'"),
    (["eval", "{run}", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["eval", "{run}", "--max-tokens", "-1"], "--max-tokens -1 must be at least 1"),
    (["eval", "{run}", "--device", "gpu9"], "--device 'gpu9' is not a device"),
    # --- generate ---
    (["generate", "{root}/nowhere", "--prompt", "Olá"], "{root}/nowhere does not exist"),
    (["generate", "{root}/empty", "--prompt", "Olá"], "has no checkpoints"),
    (["generate", "{root}/future", "--prompt", "Olá"], "unknown key model.moe_layers"),
    (["generate", "{run}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{run}", "--prompt", "   "], "--prompt is empty"),
    (["generate", "{run}", "--prompt-file", "{root}/blank.txt"], "is empty"),
    (["generate", "{run}", "--prompt-file", "{root}/nowhere.txt"], "--prompt-file {root}/nowhere.txt not found"),
    (["generate", "{run}", "--prompt-file", "{root}/empty"], "is a folder, not a file"),
    (["generate", "{run}", "--prompt-file", "{root}/latin1.txt"], "is not UTF-8 text"),
    (["generate", "{run}", "--prompts", "{root}/blank.txt"], "has no prompt"),
    (["generate", "{run}", "--prompt", LONG_PROMPT, "--max-new-tokens", "4"], "exceeds the model's context_length"),
    (GENERATE[:4] + ["--max-new-tokens", "500"], "exceeds the model's context_length (128)"),
    (GENERATE + ["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (GENERATE + ["--temperature", "-1"], "--temperature -1.0 must be a finite number >= 0"),
    (GENERATE + ["--temperature", "warm"], "invalid float value: 'warm'"),
    (GENERATE + ["--repetition-penalty", "nan"], "--repetition-penalty nan: must be a finite number"),
    (GENERATE + ["--repetition-penalty", "0"], "--repetition-penalty 0.0 must be a finite number > 0"),
    (GENERATE + ["--top-p", "2"], "--top-p 2.0 must be a number in (0, 1]"),
    (GENERATE + ["--top-p", "0"], "--top-p 0.0 must be a number in (0, 1]"),
    (GENERATE + ["--top-k", "-1"], "--top-k -1 must be an integer >= 0"),
    (GENERATE + ["--seed", str(2**64)], f"--seed {2**64} must be an integer in [0, 2**63)"),
    (GENERATE + ["--seed", str(2**63)], "must be an integer in [0, 2**63)"),
    (GENERATE + ["--seed", "-1"], "--seed -1 must be an integer in [0, 2**63)"),
    (GENERATE[:4] + ["--max-new-tokens", "-1"], "--max-new-tokens -1 must be an integer >= 0"),
    (GENERATE + ["--stop", ""], "--stop must not be empty"),
    (GENERATE + ["--num-samples", "0"], "--num-samples 0 must be >= 1"),
    (GENERATE + ["--decode-dtype", "float8"], "invalid choice: 'float8'"),
    (GENERATE + ["--compile", "--decode-dtype", "int8"], "not int8"),
    (GENERATE + ["--temprature", "0.5"], "did you mean --temperature?"),
    # --- serve ---
    (["serve", "{root}/nowhere", "--port", "0"], "{root}/nowhere does not exist"),
    (["serve", "{root}/empty", "--port", "0"], "has no checkpoints"),
    (["serve", "{root}/future", "--port", "0"], "unknown key model.moe_layers"),
    (["serve", "{run}", "--port", "{busy_port}"], "--port {busy_port} is already in use on 127.0.0.1"),
    (["serve", "{run}", "--port", "70000"], "--port 70000 must lie in 0..65535"),
    (["serve", "{run}", "--port", "-1"], "--port -1 must lie in 0..65535"),
    (["serve", "{run}", "--port", "http"], "invalid int value: 'http'"),
    (["serve", "{run}", "--host", "no.such.host.invalid", "--port", "0"], "cannot listen on --host no.such.host"),
    (["serve", "{run}", "--max-batch", "0"], "--max-batch 0 must be at least 1"),
    (["serve", "{run}", "--max-queue", "-1"], "--max-queue -1 must not be negative"),
    (["serve", "{run}", "--max-tokens-cap", "0"], "--max-tokens-cap 0 must be at least 1"),
    (["serve", "{run}", "--api-key-env", "GT_TEST_SURELY_UNSET"], "that environment variable is empty or unset"),
    (["serve", "{run}", "--compile", "--decode-dtype", "int8"], "not int8"),
    # --- report ---
    (["report", "{root}/nowhere"], "{root}/nowhere does not exist"),
    (["report", "{run}", "--eval-tokens", "-1"], "--eval-tokens -1 must be >= 0"),
    (["report", "{run}", "--eval-tokens", "lots"], "invalid int value: 'lots'"),
    # --- export ---
    (["export", "{root}/nowhere", "--out", "{out}"], "{root}/nowhere does not exist"),
    (["export", "{root}/empty", "--out", "{out}"], "has no checkpoints"),
    (["export", "{root}/future", "--out", "{out}"], "unknown key model.moe_layers"),
    (["export", "{root}/wrongtype", "--out", "{out}"], "model.d_model = '32' must be an integer"),
    (["export", "{run}", "--out", "{root}/raw"], "already exists and is not empty"),
    (["export", "{run}", "--out", "{out}", "--format", "onnx"], "invalid choice: 'onnx'"),
    (["export", "{run}", "--out", "{out}.gguf", "--format", "gguf", "--dtype", "q4_0"],
     "--dtype q4_0 is not available for --format gguf; choose one of f32, f16, q8_0"),
    (["export", "{run}", "--out", "{root}/raw", "--format", "gguf"], "is a folder; a GGUF export is one file"),
    (["export", "{root}/empty", "--out", "{out}.gguf", "--format", "gguf"], "has no checkpoints"),
    (["export", "{run}"], "the following arguments are required: --out"),
    # --- no command / unknown command ---
    (["fly"], "invalid choice: 'fly'"),
]


def case_id(case) -> str:
    argv, _ = case
    return " ".join(a if len(a) < 30 else a[:27] + "..." for a in argv)


@pytest.mark.parametrize("argv, expected", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(argv, expected, world, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GT_TEST_SURELY_UNSET", raising=False)
    values = {"root": world.root, "corpus": world.corpus, "run": world.run, "config": world.config,
              "out": tmp_path / "out", "busy_port": world.port}
    argv = [a.format(**values) for a in argv]
    expected = expected.format(**values)
    before = snapshot(world.root)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (argv, code, out, err)
    lines = err.splitlines()
    command = argv[0] if argv[0] != "fly" else ""
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gtransformer {command}: error: ".replace(" :", ":")), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err and "Traceback" not in out
    assert not (tmp_path / "out").exists(), "a failed command left its output folder behind"
    assert snapshot(world.root) == before, "a failed command changed its inputs"


def test_every_command_has_bad_input_cases():
    covered = {argv[0] for argv, _ in CASES}
    assert {"download", "prepare", "train", "eval", "generate", "serve", "report", "export"} <= covered


def test_an_unreadable_config_is_one_line(world, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    config = tmp_path / "secret.toml"
    shutil.copy(world.config, config)
    config.chmod(0)
    code, _, err = run_cli(["train", "--config", str(config), "--data", str(world.corpus), "--out",
                            str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot be read" in err and len(err.splitlines()) == 1


def test_a_good_config_still_trains(world, tmp_path, capsys):
    """The table's failures are its bad values, not checks that refuse everything."""
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--config", str(world.config), "--data", str(world.corpus), "--out", str(out),
                            "--no-progress", "--set", "train.schedule=constant"], capsys)
    assert code == 0, err
    assert RunDir(out).latest_checkpoint() is not None


# --- the HTTP API: the same sampling rules, answered as OpenAI's 400 body ----------------------------------------


@pytest.fixture(scope="module")
def api(world, make_model):
    """The app over an engine that is never started: every request below is refused before it is queued."""
    tokenizer = Tokenizer.from_file(world.run / "tokenizer.json")
    model = make_model(vocab_size=tokenizer.vocab_size, context_length=128)
    engine = Engine(model, tokenizer, max_batch=2)
    app = create_app(engine, tokenizer, 128, ServerSettings(model_name="tiny", max_tokens_cap=64), chat.DEFAULT)
    return TestClient(app)


@pytest.mark.parametrize("body, param, words", [
    ('{"prompt": "Olá", "temperature": NaN}', "temperature", "finite number"),
    ('{"prompt": "Olá", "temperature": Infinity}', "temperature", "finite number"),
    ('{"prompt": "Olá", "temperature": -1}', "temperature", "temperature = -1.0 must be a finite number >= 0"),
    ('{"prompt": "Olá", "top_p": NaN}', "top_p", "finite number"),
    ('{"prompt": "Olá", "top_p": 2}', "top_p", "top_p = 2.0 must be a number in (0, 1]"),
    ('{"prompt": "Olá", "repetition_penalty": NaN}', "repetition_penalty", "finite number"),
    ('{"prompt": "Olá", "repetition_penalty": 0}', "repetition_penalty", "must be a finite number > 0"),
    ('{"prompt": "Olá", "top_k": -1}', "top_k", "top_k = -1 must be an integer >= 0"),
    (f'{{"prompt": "Olá", "seed": {2**64}}}', "seed", "must be an integer in [0, 2**63)"),
    ('{"prompt": "Olá", "seed": -1}', "seed", "seed = -1 must be an integer in [0, 2**63)"),
    ('{"prompt": "Olá", "max_tokens": -1}', "max_tokens", "greater than or equal to 1"),
    ('{"prompt": "Olá", "max_tokens": 1000}', "max_tokens", "above this server's cap of 64"),
    ('{"prompt": "Olá", "stop": [""]}', "stop", "must not be empty"),
    ('{"prompt": "Olá", "temperature": "hot"}', "temperature", "valid number"),
    (json.dumps({"prompt": LONG_PROMPT, "max_tokens": 4}), "prompt", "exceeds the model's context"),
    ('{"messages": [{"role": "user", "content": "Olá"}], "temperature": NaN}', "temperature", "finite number"),
])
def test_api_refuses_absurd_sampling_values_with_400(api, body, param, words):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = api.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_sampling_rules_reach_the_api_through_sampling_config():
    """Values pydantic lets through are still checked by SamplingConfig.problem (the one statement of the rules)."""
    request = CompletionRequest(prompt="Olá", stop=["x"])
    request.stop = [""]  # as if a future field bypassed the request's own checks
    with pytest.raises(APIError) as exc:
        request.sampling(4)
    assert exc.value.status == 400 and exc.value.param == "stop"


# --- damaged checkpoints: load_for_inference turns each into one line (CorruptCheckpoint / UserError) ----------

DAMAGE = {
    # an older or newer [model] without a key the weights need: defaults that do not fit the saved tensors
    "meta lacks n_experts": lambda run, checkpoint: edit_meta(run, lambda m: m["config"]["model"].pop("n_experts")),
    "meta.json not JSON": lambda run, checkpoint: checkpoint.meta_path.write_text("{not json", encoding="utf-8"),
    "meta.json a list": lambda run, checkpoint: checkpoint.meta_path.write_text("[1, 2]", encoding="utf-8"),
    "weights not safetensors": lambda run, checkpoint: checkpoint.model_path.write_bytes(b"garbage"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_line(damage, world, tmp_path, capsys):
    run = shutil.copytree(world.run, tmp_path / "run")
    DAMAGE[damage](run, RunDir(run).latest_checkpoint())
    code, _, err = run_cli(["generate", str(run), "--prompt", "Olá", "--max-new-tokens", "2"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("gtransformer generate: error: "), err
