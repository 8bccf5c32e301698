#!/usr/bin/env bash
# pde.generate throughput vs a numpy/scipy implementation of the same solvers (issue 5 "Speed"):
# 64x64 Poisson samples/s and 64x64 Navier-Stokes steps/s, both on THREADS threads/processes.
# Each side runs ROUNDS times, interleaved, best of each kept (the machine may be shared).
# Usage: bench/pde/run.sh [THREADS] [ROUNDS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
threads="${1:-2}"
rounds="${2:-3}"
if [ ! -x "$here/.venv/bin/python" ]; then
  python3 -m venv "$here/.venv"
  "$here/.venv/bin/pip" install --quiet numpy scipy
fi
(cd "$root" && cargo build --quiet --release -p ops --example pde_bench)
target="${CARGO_TARGET_DIR:-$root/target}"
: > "$here/results.jsonl"
for _ in $(seq "$rounds"); do
  "$target/release/examples/pde_bench" --threads "$threads" >> "$here/results.jsonl"
  "$here/.venv/bin/python" "$here/reference.py" --threads "$threads" >> "$here/results.jsonl"
done
"$here/.venv/bin/python" - "$here/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    b = best.setdefault(r["impl"], {})
    for k, v in r.items():
        if k.endswith("_per_s"):
            b[k] = max(b.get(k, 0.0), v)
t = rows[0]["threads"]
# Rounds alternate rust, numpy: the ratio within each round compares runs seconds apart.
pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2]) if a["impl"] == "rust" and b["impl"] == "numpy"]
print(f"| 64x64, {t} threads | Rust (best) | numpy/scipy (best) | ratio of bests | per-round ratios (median) |")
print("|---|---:|---:|---:|---|")
for key, label in [("poisson_labeled_samples_per_s", "Poisson samples/s (labeled)"),
                   ("poisson_unlabeled_samples_per_s", "Poisson samples/s (unlabeled)"),
                   ("ns_steps_per_s", "Navier-Stokes steps/s")]:
    r, n = best["rust"][key], best["numpy"][key]
    ratios = sorted(a[key] / b[key] for a, b in pairs)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1:len(ratios) // 2 + 1]) / 2
    each = ", ".join(f"{x:.2f}" for x in ratios)
    print(f"| {label} | {r:,.0f} | {n:,.0f} | {r / n:.2f}x | {each} ({median:.2f}x) |")
PY
