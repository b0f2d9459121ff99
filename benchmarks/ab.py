"""Two checkouts side by side: one benchmark script run from each, alternating, and the ratio of their speeds.

Each round runs `OLD/benchmarks/SCRIPT ARGS --json F` then the same from NEW (the order flips every
round), so both see the same machine load; each checkout's script imports its own `src/`. The
script must write rows with "model" and "tokens_per_s" to its --json file (bench_generate,
bench_step, bench_train do). Reported per model: the median tokens/s of each side and new / old.

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py --old /tmp/old --new . --rounds 3 -- bench_generate.py --preset tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(checkout: Path, script: str, args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, str(checkout / "benchmarks" / script), *args, "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"ab: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
        rows = json.loads(out.read_text())["results"]
    return {row["model"]: row["tokens_per_s"] for row in rows if "tokens_per_s" in row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the baseline checkout")
    parser.add_argument("--new", type=Path, required=True, help="the checkout under test")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...], a script of benchmarks/")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.rounds < 1:
        parser.error("give --rounds >= 1 and a benchmark: -- bench_generate.py [ARGS...]")
    script, script_args = command[0], command[1:]
    speeds: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for round_ in range(args.rounds):
        sides = [("old", args.old), ("new", args.new)]
        for side, checkout in sides if round_ % 2 == 0 else sides[::-1]:
            for model, tokens_per_s in run_once(checkout, script, script_args).items():
                speeds[side].setdefault(model, []).append(tokens_per_s)
            print(f"# round {round_ + 1} {side}: " + ", ".join(
                f"{m} {v[-1]:,.1f}" for m, v in speeds[side].items()), flush=True)
    print(f"\n| model | old tokens/s (each) | new tokens/s (each) | new / old (medians) |\n|---|---|---|---|")
    for model in speeds["new"]:
        old, new = speeds["old"].get(model), speeds["new"][model]
        if not old:
            continue
        each = lambda values: ", ".join(f"{v:,.1f}" for v in values)  # noqa: E731
        ratio = statistics.median(new) / statistics.median(old)
        print(f"| {model} | {each(old)} | {each(new)} | **{ratio:.2f}x** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
