#!/usr/bin/env bash
# Cache-key compatibility between two engine builds: fills a cache with OLD on every pipeline of
# pipelines/ and examples/ (paper pipelines shrunk with the same --set lists as their smoke tests),
# then runs NEW on the same files and cache. Every stage must be a hit: a stage NEW runs means its
# key changed. Prints one line per pipeline and exits 1 when any stage ran.
#
#   bench/keycompat/run.sh OLD_ENGINE NEW_ENGINE [WORKDIR]
#
# PHASE=fill fills WORKDIR with OLD only; PHASE=check then runs NEW against it (the fill takes
# most of the time and can run while NEW is being built).
set -euo pipefail
phase=${PHASE:-all}
old=${1:?usage: run.sh OLD_ENGINE NEW_ENGINE [WORKDIR]}
new=${2:?usage: run.sh OLD_ENGINE NEW_ENGINE [WORKDIR]}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${3:-$(mktemp -d)}
mkdir -p "$work"

operator_sets=(vars.resolution=8 vars.width=4 "vars.modes=[2,2]" vars.layers=1 vars.head_width=8
  vars.unlabeled=32 vars.pool=24 vars.val=4 vars.test=4 vars.ood_test=4 vars.ood_pool=2
  "vars.Ns=[4,16]" vars.icl_n=16 "vars.seeds=[0,1]" "vars.Js=[0,2]" vars.pretrain_epochs=2
  vars.finetune_epochs=2)
nb201_sets=(vars.samples=240 vars.channels=2 vars.epochs=1 "vars.seeds=[0]"
  'vars.archs=["3_30_243", "1_11_042", "4_12_104", "2_44_120"]')

# name|file|sets (one --set per line of the here-string)
run_case() {
  local name=$1 file=$2
  shift 2
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  # A copy of the pipeline's folder, so `outs` and reports land in the work folder.
  local ws="$work/$name"
  local copy="$ws/$(basename "$file")"
  local cache="$ws/.cache"
  if [ "$phase" != check ]; then
    rm -rf "$ws"
    mkdir -p "$ws"
    cp -r "$(dirname "$file")"/. "$ws/"
    "$old" run "$copy" --cache-dir "$cache" -j 2 --json "${sets[@]}" >"$ws/old.json" 2>"$ws/old.err" ||
      { echo "$name: the old engine failed (see $ws/old.err)"; return 1; }
  fi
  [ "$phase" = fill ] && { echo "$name: filled"; return 0; }
  "$new" run "$copy" --cache-dir "$cache" -j 2 --json "${sets[@]}" >"$ws/new.json" 2>"$ws/new.err" ||
    { echo "$name: the new engine failed (see $ws/new.err)"; return 1; }
  python3 - "$name" "$ws/old.json" "$ws/new.json" <<'PY'
import json, sys
name, old, new = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
stages = new["stages"]
ran = [s["name"] for s in stages if s["status"] != "cached"]
print(f"{name}: {len(old['stages'])} stages filled by old, {len(stages) - len(ran)} hit by new, {len(ran)} ran")
for s in ran[:10]:
    print(f"  ran: {s}")
sys.exit(1 if ran else 0)
PY
}

status=0
run_case demo "$root/examples/demo/pipeline.yaml" || status=1
run_case ml "$root/examples/ml/pipeline.yaml" vars.epochs=1 || status=1
run_case arch_aware_lr "$root/pipelines/arch_aware_lr.yaml" vars.samples=300 vars.width=8 \
  vars.cnn_width=2 "vars.seeds=[0]" "vars.lr_grid=[0.05, 0.4, 3.2]" \
  'vars.chains=["2_02_002", "2_02_002_0002_00002"]' 'vars.mlp_topologies=["2_02_002", "2_21_112"]' \
  'vars.cnn_topologies=["2_02_002"]' "vars.kernels=[3, 7]" || status=1
run_case nb201_rerank "$root/pipelines/nb201_rerank.yaml" "${nb201_sets[@]}" \
  "vars.top_k_table=[100]" || status=1
run_case connectivity "$root/pipelines/connectivity.yaml" vars.samples=200 vars.width=8 \
  vars.epochs=2 "vars.epoch_points=[1, 2]" "vars.seeds=[0]" vars.nas_samples=240 \
  vars.nas_channels=2 vars.nas_epochs=1 vars.nas_draws=24 "vars.nas_seeds=[0]" \
  "vars.nas_proxy={channels: 1, batch: 4}" || status=1
run_case teg_nas "$root/pipelines/teg_nas.yaml" "${nb201_sets[@]}" \
  "vars.proxy={channels: 1, batch: 4, repeats: 1, region_samples: 40}" vars.population=4 \
  vars.tournament=2 vars.cycles=2 vars.steps=2 vars.random_samples=3 || status=1
run_case asvit "$root/pipelines/asvit.yaml" vars.samples=200 vars.size=16 vars.hidden=8 \
  "vars.probe={hidden: 8, image_size: 16, points: 8, batch: 4, repeats: 1}" vars.tau_samples=3 \
  "vars.tau_topologies=[0, 1, 2]" vars.search_steps=2 vars.scale_steps=1 vars.budget=100000000 \
  vars.target=90000000 "vars.members=[0, 1]" vars.epochs=2 "vars.retokenize=[[1, 2], [2, 1]]" \
  vars.batch_size=32 || status=1
run_case operator_learning "$root/pipelines/operator_learning.yaml" "${operator_sets[@]}" || status=1
run_case operator_learning_time "$root/pipelines/operator_learning_time.yaml" "${operator_sets[@]}" \
  vars.ns_t_end=0.1 vars.rd_t_end=0.1 || status=1
exit $status
