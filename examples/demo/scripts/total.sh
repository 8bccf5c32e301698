#!/usr/bin/env bash
# Sums every power[p=*] result; writes a workspace file and the stage's metrics.
set -euo pipefail
mkdir -p results
: > results/total.txt
for part in "$ENGINE_IN_PARTS"/*/; do
  label=$(basename "$part")
  sum=$(awk '{s+=$1} END {print s}' "$part/values.txt")
  echo "$label $sum" >> results/total.txt
done
grand=$(awk '{s+=$2} END {print s}' results/total.txt)
echo "::progress:: summed $(wc -l < results/total.txt) parts"
echo "{\"grand_total\": $grand, \"parts\": $(wc -l < results/total.txt)}" > "$ENGINE_OUT/metrics.json"
