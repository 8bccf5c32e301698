#!/usr/bin/env bash
# Two engine builds side by side on the overhead benchmark's 10,000-stage matrix pipeline:
# a cold run (every stage runs) and the no-op run (every stage cached), interleaved, so both
# builds see the same machine load. Prints the median of each and the ratio NEW / OLD.
#
#   bench/overhead/compare.sh OLD_ENGINE NEW_ENGINE [N] [REPS]
set -euo pipefail
old=${1:?usage: compare.sh OLD_ENGINE NEW_ENGINE [N] [REPS]}
new=${2:?usage: compare.sh OLD_ENGINE NEW_ENGINE [N] [REPS]}
n=${3:-10000}
reps=${4:-5}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d /tmp/engine-compare.XXXXXX)"
trap 'rm -rf "$work"' EXIT
python3 "$here/gen.py" matrix "$n" "$work/gen" --tools engine >/dev/null
seconds() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
declare -A cold noop
for which in old new; do cold[$which]=""; noop[$which]=""; done
for which in old new; do
  bin=${!which}
  ws="$work/$which"
  cp -r "$work/gen/engine" "$ws"
  cold[$which]=$(seconds "$bin" run "$ws/pipeline.yaml" -j 2)
done
for rep in $(seq 1 "$reps"); do
  for which in old new; do
    bin=${!which}
    noop[$which]+=" $(seconds "$bin" run "$work/$which/pipeline.yaml" -j 2)"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
o=$(echo "${noop[old]}" | median); w=$(echo "${noop[new]}" | median)
echo "| run ($n-stage matrix, -j 2) | old s | new s | new / old |"
echo "|---|---|---|---|"
printf '| cold (1 run) | %.2f | %.2f | %.2fx |\n' "${cold[old]}" "${cold[new]}" "$(echo "${cold[new]} / ${cold[old]}" | bc -l)"
printf '| no-op (median of %d) | %.3f | %.3f | %.2fx |\n' "$reps" "$o" "$w" "$(echo "$w / $o" | bc -l)"
echo "no-op runs: old [${noop[old]} ] new [${noop[new]} ]"
