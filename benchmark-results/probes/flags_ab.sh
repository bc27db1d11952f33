#!/usr/bin/env bash
# Probe (2026-12-06): XLA flags for the decode loop, A/B: command buffers (CUDA graphs) and autotuning. The 7B
# fast path (fused, kernel attention, cuBLAS for every product), batch 128, greedy, 64 + 128 tokens, one process
# per run, the ways alternating so that a drift of the card's speed over the call falls on each alike:
#   default   XLA's default command buffers (sequences of kernels inside the loop body are graphs; the host
#             still runs the loop, one graph launch or more per step, and waits for each step's stop flag)
#   while     --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL: the whole loop one graph, with conditional
#             nodes (CUDA 12.4+), so the host launches once per call
#   none      --xla_gpu_enable_command_buffer= : no graphs, every kernel launched by the host
#   noautotune --xla_gpu_autotune_level=0: cuBLAS's own heuristic algorithm for each product instead of the one XLA's
#             autotuner times fastest (added 2026-12-06: under Nsight Compute, with autotuning off, the H100 ran the
#             batch-128 down product unsplit at 1.02x its floor, where the step's autotuned split-K ran 1.26x)
# Files: verbalize-7b-flags-N-WAY.json (the command-buffer runs of 2026-12-06 wrote verbalize-7b-cmdbuf-N-WAY.json)
# Usage: [WAYS="default while none default while none"] [REPS=5] flags_ab.sh OUT_DIR
set -euo pipefail
out=${1:?usage: flags_ab.sh OUT_DIR}
base=--xla_gpu_enable_triton_gemm=false
n=0
for way in ${WAYS:-default while none default while none}; do
  n=$((n + 1))
  case $way in
    default) flags=$base ;;
    while) flags="$base --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" ;;
    none) flags="$base --xla_gpu_enable_command_buffer=" ;;
    noautotune) flags="$base --xla_gpu_autotune_level=0" ;;
    *) echo "flags_ab.sh: unknown way $way (default, while, none, noautotune)" >&2; exit 2 ;;
  esac
  XLA_FLAGS=$flags python3 -m crossmap.cli bench verbalize --preset 7b --projections fused --torch-device none \
    --no-logit-error --reps "${REPS:-5}" --out "$out/verbalize-7b-flags-$n-$way.json" 2>&1 | grep "crossmap (" || true
done
