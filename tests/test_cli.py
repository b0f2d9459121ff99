"""The command line as a user meets it: help for everything, one-line errors."""

import argparse
import subprocess
import sys

import pytest

from gtransformer.cli import build_parser, main

COMMANDS = ["download", "prepare", "train", "eval", "generate", "serve", "report", "export"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gtransformer", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gtransformer " + command)
    # Every argument of the command carries a help text, and the printed help shows it.
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    actions = [a for a in subparsers.choices[command]._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    for action in actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings or action.dest}"
        assert " ".join(action.help.split()[:3]) in " ".join(out.split()), action.help


@pytest.mark.parametrize(
    "args, words",
    [
        (["prepare", "--raw", "/nonexistent/raw", "--out", "/tmp/gt-never"], "/nonexistent/raw"),
        (["eval", "/nonexistent/run"], "/nonexistent/run"),
        (["generate", "/nonexistent/run", "--prompt", "Olá"], "/nonexistent/run"),
        (["report", "/nonexistent/run"], "/nonexistent/run"),
        (["export", "/nonexistent/run", "--format", "hf", "--out", "/tmp/gt-never-export"], "/nonexistent/run"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, words):
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert words in lines[0]


def test_train_rejects_missing_config(tmp_path):
    result = run_cli("train", "--config", str(tmp_path / "nope.toml"), "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr and "Traceback" not in result.stderr


def test_no_command_prints_help():
    result = run_cli()
    assert result.returncode == 2
    assert "usage" in result.stdout
