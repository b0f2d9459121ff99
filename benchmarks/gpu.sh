#!/usr/bin/env bash
# One command for an H100: our model against HF Mixtral (grouped_mm), training at the
# base preset (batch 16 x 1024, bf16 autocast, torch.compile) and batch-1 generation
# (ours eager, ours with the compiled decoding step, HF);
# prints a short table (tokens/s, MFU, peak memory) and keeps the JSON results.
#
#   bash benchmarks/gpu.sh                       # the real run, on the GPU machine
#   bash benchmarks/gpu.sh --device cpu --preset tiny --batch 2 --seq 32 --steps 1 --reps 1 \
#        --new-tokens 8 --no-compile --no-memory  # the same code path at toy size (tests)
#
# No network and no pip there: the package is imported from src/ via PYTHONPATH.
# Budget (H100): two compilations + 3 x 10 timed steps per model, then generation
# (HF decodes ~10 tokens/s at this size, hence 2 repetitions); well under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda preset=base batch=16 seq=1024 steps=10 reps=3 warmup=3
new_tokens=256 gen_reps=2 compile=--compile models=ours,hf:grouped_mm memory=
gen_models=ours,ours:compiled,hf:grouped_mm
sets=()
out="${OUT:-benchmarks/out}/gpu-$(date +%Y%m%d-%H%M%S)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --preset) preset=$2; shift 2 ;;
        --batch) batch=$2; shift 2 ;;
        --seq) seq=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --reps) reps=$2; gen_reps=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --new-tokens) new_tokens=$2; shift 2 ;;
        --models) models=$2; shift 2 ;;
        --gen-models) gen_models=$2; shift 2 ;;
        --set) sets+=(--set "$2"); shift 2 ;;
        --no-compile) compile=; shift ;;
        --no-memory) memory=--no-memory; shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
mkdir -p "$out"
if [[ $device == cuda* ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

start=$SECONDS
# shellcheck disable=SC2086  # $compile and $memory are deliberately empty or one flag
"$python" benchmarks/bench_train.py --device "$device" --preset "$preset" --batch "$batch" --seq "$seq" \
    --steps "$steps" --reps "$reps" --warmup "$warmup" --dtype bf16 $compile $memory --models "$models" "${sets[@]}" \
    --json "$out/train.json" 2>&1 | tee "$out/train.log"
echo "# training done in $((SECONDS - start)) s"
"$python" benchmarks/bench_generate.py --device "$device" --preset "$preset" --dtype bf16 \
    --new-tokens "$new_tokens" --reps "$gen_reps" --models "$gen_models" "${sets[@]}" \
    --json "$out/generate.json" 2>&1 | tee "$out/generate.log"
echo "# total $((SECONDS - start)) s; results in $out"
echo
# The short table, from the two JSON files (standard library only: no second torch import).
"$python" - "$out/train.json" "$out/generate.json" <<'PY' | tee "$out/summary.txt"
import json, sys

train, generate = (json.load(open(path)) for path in sys.argv[1:3])
env, args, gen_args = train["env"], train["args"], generate["args"]
print(f"# {env['date']}  commit {env['commit']}  {env.get('gpu', env['cpu'])}  torch {env['torch']}  "
      f"transformers {env['transformers']}")
print(f"# {env['command']}  |  {generate['env']['command']}")
print(f"# train: preset {args['preset']}, batch {args['batch']} x {args['seq']}, {args['dtype']}, compile "
      f"{args['compile']}, median of {args['reps']} x {args['steps']} steps; MFU = tokens/s x "
      f"{train['flops_per_token']:.4g} FLOPs/token / 790e12")
print(f"# generate: batch 1, prompt {gen_args['prompt_len']} + {gen_args['new_tokens']} new tokens, greedy, "
      f"{gen_args['dtype']}, median of {gen_args['reps']}")
gen = {row["model"]: row for row in generate["results"]}
names = [row["model"] for row in train["results"]] + [n for n in gen if n not in {r["model"] for r in train["results"]}]
trained = {row["model"]: row for row in train["results"]}

def cell(value, spec):
    return "-" if value is None else format(value, spec)

header = ["model", "train tok/s", "MFU", "train peak MiB", "gen tok/s", "gen peak MiB", "error"]
lines = [header]
for name in names:
    t, g = trained.get(name, {}), gen.get(name, {})
    errors = "; ".join(e for e in (t.get("error"), g.get("error")) if e)
    lines.append([name, cell(t.get("tokens_per_s"), ",.0f"), cell(t.get("mfu"), ".1%"),
                  cell(t.get("peak_mb"), ",.0f"), cell(g.get("tokens_per_s"), ",.1f"),
                  cell(g.get("peak_mb"), ",.0f"), errors])
widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
for n, line in enumerate(lines):
    print("  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
    if n == 0:
        print("  ".join("-" * w for w in widths))
for ours in [n for n in names if n.startswith("ours")]:
    ours_t, ours_g = trained.get(ours, {}), gen.get(ours, {})
    for name in [n for n in names if not n.startswith("ours")]:
        parts = [f"{label} {a[key] / b[key]:.2f}x" for label, a, b, key in (
            ("training", ours_t, trained.get(name, {}), "tokens_per_s"),
            ("generation", ours_g, gen.get(name, {}), "tokens_per_s")) if a.get(key) and b.get(key)]
        if parts:
            print(f"# {ours} vs {name}: " + ", ".join(parts))
PY
