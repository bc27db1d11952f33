#!/usr/bin/env bash
# Nsight Compute on single decode products (2026-12-06): each spec "BATCH PRODUCT KERNEL REGEX" runs
# split_k_int8.py --ncu in its own process under ncu, which profiles the last of its $calls calls of the kernels
# whose names match REGEX (caches flushed before each replay pass, as a decode step finds its weights: not in L2).
# Usage: ncu_products.sh OUT_DIR "32 gate_up triton-int8 int8_matmul" ...
set -uo pipefail
out=${1:?usage: ncu_products.sh OUT_DIR SPEC...}
shift
here=$(dirname "$0")
calls=4  # calls of the product per process; the first ones compile and warm it
sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables
  --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats
  --section SchedulerStats"
for spec in "$@"; do
  read -r batch product kernel regex <<< "$spec"
  name="ncu-$kernel-$product-b$batch"
  # shellcheck disable=SC2086
  timeout 240 ncu --clock-control none -k "regex:$regex" --launch-skip $((calls - 1)) --launch-count 1 $sections \
    --csv --page details python3 "$here/split_k_int8.py" --ncu "$batch" "$product" "$kernel" "$calls" \
    > "$out/$name.csv" 2> "$out/$name.err"
  echo "$name: rc $? $(grep -c . "$out/$name.csv") lines"
done
