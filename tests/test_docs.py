"""Every `gtransformer` command in the docs' fenced shell blocks parses, and the short ones run.

The commands are read from README.md and docs/*.md. Each is parsed by the real CLI parser
(`cli.build_parser`), which is what `--help` documents. The short ones (those that read a
run folder, and `download` from a mirror) then run as written, with bash, in a sandbox
folder laid out like the docs assume: `runs/small` (a tiny trained run; `runs/tiny` and
`runs/demo` name it too),
`data/prepared`, `../shared/gutenberg-mirror` (a small synthetic mirror) and
`prompts.txt`. Training and serving commands are only parsed: they run for minutes or
forever, and tests/test_train.py, tests/test_serve.py and the notebooks cover them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gtransformer.cli import build_parser
from gtransformer.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell|console)?\s*$\n(.*?)^```\s*$", re.M | re.S)
COMMAND_LINE = re.compile(r"^\s*(\S*/)?(gtransformer|torchrun)\s")
RUNS_QUICKLY = {"eval", "generate", "report", "export", "download"}
ENV_VALUES = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "HF_TOKEN": "unused"}

pytestmark = pytest.mark.slow


def shell_lines(text: str) -> list[str]:
    """The lines of the fenced shell blocks (and command lines of unlabeled fences), continuations joined,
    comments dropped."""
    lines = []
    for match in FENCE.finditer(text):
        joined = re.sub(r"\\\n\s*", " ", match.group(2))
        for line in joined.splitlines():
            if match.group(1) is None and not COMMAND_LINE.match(line):
                continue  # an unlabeled fence is a diagram or plain text, except for lines that are commands
            words = shlex.split(line, comments=True)
            if words:
                lines.append(" ".join(shlex.quote(w) if not re.fullmatch(r"[|<>&;]+", w) else w for w in words))
    return lines


def gtransformer_argv(line: str) -> list[str] | None:
    """The arguments after `gtransformer` (or `-m gtransformer`) in a shell line, None when there is none."""
    for segment in re.split(r"\s(?:\||&&|;)\s", line):
        words = [os.path.expandvars(w) for w in shlex.split(segment)]
        words = [ENV_VALUES.get(w.lstrip("$"), w) if w.startswith("$") else w for w in words]
        for i, word in enumerate(words):
            if word.endswith("gtransformer") and (i == 0 or words[i - 1] == "-m" or "/" in word):
                argv = words[i + 1 :]
                return argv[: argv.index(">")] if ">" in argv else argv
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    commands = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text(encoding="utf-8")):
            argv = gtransformer_argv(line)
            if argv is not None:
                commands.append((doc.name, line, argv))
    return commands


COMMANDS = documented_commands()


def test_the_docs_have_commands_for_every_stage():
    documented = {argv[0] for _, _, argv in COMMANDS if argv}
    assert {"download", "prepare", "train", "eval", "generate", "serve", "report", "export"} <= documented


def test_shell_lines_join_continuations_and_drop_comments():
    text = "```bash\ngtransformer train --config a.toml \\\n    --out runs/x  # trains\n# only a comment\n```\n"
    assert shell_lines(text) == ["gtransformer train --config a.toml --out runs/x"]
    assert gtransformer_argv("echo hi | gtransformer generate runs/a > out.jsonl") == ["generate", "runs/a"]
    assert gtransformer_argv("torchrun --nproc_per_node=2 -m gtransformer train --out r") == ["train", "--out", "r"]
    assert gtransformer_argv("make demo") is None


@pytest.mark.parametrize("doc, line, argv", COMMANDS, ids=[f"{d}:{' '.join(a[:2])}" for d, _, a in COMMANDS])
def test_documented_command_parses(doc, line, argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{line}` does not parse (exit {exc.code})")
    assert getattr(args, "func", None) is not None, f"{doc}: `{line}` names no command"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, make_corpus, tiny_tables, small_mirror_factory) -> Path:
    """A folder laid out as the docs assume, with ../shared/gutenberg-mirror beside it."""
    root = tmp_path_factory.mktemp("docs")
    work = root / "work"
    (root / "shared").mkdir()
    (root / "shared" / "gutenberg-mirror").symlink_to(small_mirror_factory(root / "mirror"))
    data = make_corpus(work / "data" / "prepared")
    tables = tiny_tables(data, max_steps=2, sample_prompts=["Era uma vez"])
    tables["model"]["context_length"] = 256  # the docs generate up to 200 tokens
    train(tables, work / "runs" / "small", progress_bar=False)
    for name in ("tiny", "demo"):  # the run names the other docs use
        (work / "runs" / name).symlink_to("small")
    (work / "prompts.txt").write_text("Era uma vez\nO amor é\n", encoding="utf-8")
    return work


SHORT = [(doc, line, argv) for doc, line, argv in COMMANDS
         if argv and argv[0] in RUNS_QUICKLY and "--interactive" not in argv
         and not (argv[0] == "download" and "--mirror" not in argv)]


@pytest.mark.parametrize("doc, line, argv", SHORT, ids=[f"{d}:{' '.join(a[:2])}" for d, _, a in SHORT])
def test_short_documented_command_runs(doc, line, argv, sandbox):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    if argv[0] == "export":  # the docs' folders may already hold an export from another line
        line = line + " --force"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {line}"], cwd=sandbox, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{doc}: `{line}` failed:\n{done.stderr[-2000:]}"
