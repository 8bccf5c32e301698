#!/usr/bin/env bash
# Training throughput and peak memory, the nn crate vs PyTorch (CPU), side by side.
#
#   bench/training/run.sh                 # REPS=5 repetitions, default step counts
#   REPS=3 MLP_STEPS=20 bench/training/run.sh
#
# Each repetition runs every model once in PyTorch and once in engine, interleaved, each in a
# fresh process (so VmHWM is that run's peak). Figures are medians over repetitions. Raw JSON
# lines go to bench/training/out/results.jsonl, the table to stdout.
#
# Threads: 2 on both sides (RAYON_NUM_THREADS for dfdx's gemm, torch.set_num_threads +
# OMP/MKL_NUM_THREADS for PyTorch). OMP_WAIT_POLICY=PASSIVE: on a shared, loaded machine
# libgomp's default spin-waiting makes PyTorch several times slower (rayon already parks idle
# threads), which would flatter engine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

REPS="${REPS:-5}"
SUMMARY_ONLY="${SUMMARY_ONLY:-0}"   # 1: only re-summarise out/results.jsonl
MLP_STEPS="${MLP_STEPS:-50}"
NB201_STEPS="${NB201_STEPS:-8}"
FNO_STEPS="${FNO_STEPS:-10}"
WARMUP="${WARMUP:-2}"
THREADS=2

if [ "$SUMMARY_ONLY" != 1 ]; then
# --- PyTorch in a throwaway venv -----------------------------------------------------------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
    python3 -m venv .venv
    # The CPU-only index is smaller; where only PyPI is reachable its (CUDA) wheel runs on CPU.
    .venv/bin/pip install -q --timeout 10 --retries 0 torch \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || .venv/bin/pip install -q torch \
        || { echo "error: could not install torch into $here/.venv (no PyPI access?)" >&2; exit 1; }
fi

# --- engine harness ------------------------------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && cargo build --release -q -p nn --example train_bench)
engine_bin="$CARGO_TARGET_DIR/release/examples/train_bench"

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export OMP_WAIT_POLICY=PASSIVE

mkdir -p out
results="out/results.jsonl"
: > "$results"
{
    echo "## machine"
    echo "nproc: $(nproc)"
    lscpu | head -n 15
    free -m
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "rustc: $(rustc --version)"
    echo "torch: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
    echo "python: $(.venv/bin/python --version 2>&1)"
} | tee out/machine.txt

steps_for() {
    case "$1" in
        mlp) echo "$MLP_STEPS" ;;
        nb201) echo "$NB201_STEPS" ;;
        fno2d) echo "$FNO_STEPS" ;;
    esac
}

for rep in $(seq 1 "$REPS"); do
    for model in mlp nb201 fno2d; do
        steps="$(steps_for "$model")"
        echo "rep $rep/$REPS $model ($steps steps) ..." >&2
        .venv/bin/python torch_bench.py "$model" "$steps" --warmup "$WARMUP" --threads "$THREADS" \
            >> "$results"
        "$engine_bin" "$model" "$steps" --warmup "$WARMUP" >> "$results"
    done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a out/machine.txt
fi
results="out/results.jsonl"

# --- medians and ratios --------------------------------------------------------------------
python3 - "$results" <<'EOF'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: statistics.median(xs)
print()
print("| model | batch | params | PyTorch steps/s | engine steps/s | engine/PyTorch throughput "
      "| paired per-rep ratio, median [min-max] | PyTorch peak RSS MiB | engine peak RSS MiB "
      "| engine/PyTorch peak RSS | PyTorch working set MiB | engine working set MiB "
      "| engine/PyTorch working set |")
print("|---" * 13 + "|")
for model in ["mlp", "nb201", "fno2d"]:
    t = [r for r in rows if r["model"] == model and r["impl"] == "torch"]
    e = [r for r in rows if r["model"] == model and r["impl"] == "engine"]
    if not t or not e:
        continue
    if t[0]["params"] != e[0]["params"]:
        print(f"warning: {model}: parameter counts differ ({t[0]['params']} vs {e[0]['params']})",
              file=sys.stderr)
    ts, es = med([r["steps_per_s"] for r in t]), med([r["steps_per_s"] for r in e])
    tm, em = med([r["peak_rss_mib"] for r in t]), med([r["peak_rss_mib"] for r in e])
    tw = med([r["peak_rss_mib"] - r["rss_before_mib"] for r in t])
    ew = med([r["peak_rss_mib"] - r["rss_before_mib"] for r in e])
    # Runs of one repetition are back to back, so their ratio sees similar machine load.
    paired = [b["steps_per_s"] / a["steps_per_s"] for a, b in zip(t, e)]
    print(f"| {model} | {e[0]['batch']} | {e[0]['params']} | {ts:.3g} | {es:.3g} | {es / ts:.2f}x "
          f"| {med(paired):.2f}x [{min(paired):.2f}-{max(paired):.2f}] | {tm:.0f} | {em:.0f} | {em / tm:.2f}x | {tw:.0f} | {ew:.0f} "
          f"| {ew / tw:.2f}x |")
    spread = lambda rs: ", ".join(f"{r['steps_per_s']:.3g}" for r in rs)
    print(f"<!-- {model}: torch runs [{spread(t)}], engine runs [{spread(e)}] -->")
EOF
