#!/usr/bin/env bash
# Overhead benchmark: engine vs Snakemake vs DVC on the same trivial pipelines.
#
#   bench/overhead/run.sh            full run (~40 min on 2 cores), writes bench/RESULTS.md
#   bench/overhead/run.sh --smoke    N=100, 1 repetition, peers only if already installed (<1 min)
#
# Other flags go to bench.py (--sizes, --shapes, --reps, --skip pipelines,planning,hashing,
# --no-profile, --keep, --out FILE). Environment:
#   ENGINE_BIN      use this engine binary instead of building one
#   CARGO_TARGET_DIR  where `cargo build --release -p engine` puts it (default: target/)
#   NO_PEERS=1      measure engine alone
#   SNAKEMAKE_SPEC / DVC_SPEC   pip requirement for the peers (default: the pinned versions)
#
# The peers live in a throwaway venv, bench/overhead/.venv (gitignored); they are never a
# dependency of the tests. Scratch pipelines and the 1 GiB hashing file live in a temporary
# folder under /tmp that is removed on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
smoke=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && smoke=1; done

# ---- engine
if [[ -n "${ENGINE_BIN:-}" ]]; then
    engine="$ENGINE_BIN"
else
    target="${CARGO_TARGET_DIR:-$repo/target}"
    echo "building engine (release) into $target ..."
    (cd "$repo" && cargo build --release -p engine --quiet)
    engine="$target/release/engine"
fi
[[ -x "$engine" ]] || { echo "error: no engine binary at $engine" >&2; exit 2; }

# ---- peers, in a venv this script owns
venv="$here/.venv"
snakemake_spec="${SNAKEMAKE_SPEC:-snakemake==9.27.1}"
dvc_spec="${DVC_SPEC:-dvc==3.67.1}"
tools="engine"
missing=""
if [[ "${NO_PEERS:-0}" != 1 ]]; then
    if [[ $smoke == 0 ]]; then
        if [[ ! -x "$venv/bin/python" ]]; then
            python3 -m venv "$venv"
        fi
        for spec in "$snakemake_spec" "$dvc_spec"; do
            name="${spec%%[=<>]*}"
            have="$("$venv/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
            [[ "$spec" == "$name==$have" ]] && continue
            if ! "$venv/bin/python" -m pip install --quiet "$spec" >"$here/.venv/pip-$name.log" 2>&1; then
                missing+="$name=pip install $spec failed (see bench/overhead/.venv/pip-$name.log);"
                echo "warning: could not install $spec; measuring without it" >&2
            fi
        done
    fi
    for peer in snakemake dvc; do
        if [[ -x "$venv/bin/$peer" ]] && "$venv/bin/$peer" --version >/dev/null 2>&1; then
            tools+=",$peer"
        elif [[ "$missing" != *"$peer="* ]]; then
            missing+="$peer=not installed in bench/overhead/.venv (run without --smoke to install);"
        fi
    done
fi

work="$(mktemp -d /tmp/engine-overhead.XXXXXX)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

out=()
if [[ $smoke == 0 ]]; then out=(--out "$repo/bench/RESULTS.md"); fi
python3 "$here/bench.py" --engine "$engine" --venv "$venv" --work "$work" --tools "$tools" \
    --peer-missing "$missing" "${out[@]}" "$@"
