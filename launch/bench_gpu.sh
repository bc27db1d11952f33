#!/usr/bin/env bash
# The GPU benchmarks behind BENCHMARKS.md, one after another, JSON into OUT_DIR.
#   launch/bench_gpu.sh OUT_DIR [forward|ridge|verbalize|verbalize-sampled|decode-paths|decode-paths-27b|decode-paths-no-triton-gemm|verbalize-nla-fast|fast-scan|scan-kernel|stop-check|step-kernel|verbalize-27b|verbalize-nla|scan|int8|int8-fast|int8-mosaic|int8-f16|top-p|scaling|paper ...]
# scaling compares one GPU with all of them: run it on a multi-GPU node (it is not in the default list).
# paper runs configs/paper.py at the 7B/27B shapes on random checkpoints it writes (~70 GB of disk;
# two GPUs or more): TOKENIZERS names a directory with qwen2.5/ and gemma3/ tokenizer directories (unpack
# the archive launch/pack_tokenizers.sh makes) and
# EMBEDDER a sentence-transformer directory.
set -uo pipefail
out=${1:?usage: launch/bench_gpu.sh OUT_DIR [bench ...]}
shift
benches=${*:-forward ridge verbalize}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# JAX's share of the GPU (it grows on demand here: the benches turn preallocation off for the PyTorch peers). At
# the default 0.75 a 27B run's fourth variant found no 12.9 GiB block for its cache, the freed weights of the
# first three left in pieces (benchmark-results/verbalize-27b-compile-fused-oom-h200.log).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# the flags a scanned decode wants (weights read in place from the stacks), from their one definition
scanned_flags=$(python3 -c 'from crossmap.models.scan import SCANNED_GPU_XLA_FLAGS as f; print(" ".join(f))') ||
  { echo "launch/bench_gpu.sh: crossmap is not importable from here (install it, or run from a checkout)" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# int8_fast_path WEIGHTS NAME BATCH...: the 7B decode on the fast path (fused projections, kernel attention, cuBLAS
# for bf16) with the --weights formats WEIGHTS side by side, at each batch in turn, into verbalize-7b-NAME-bBATCH.json
int8_fast_path() {
  local weights=$1 name=$2 batch
  shift 2
  for batch in "$@"; do
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -m crossmap.cli bench verbalize --preset 7b \
      --batch "$batch" --projections fused --weights "$weights" --torch-device none \
      --out "$out/verbalize-7b-$name-b$batch.json"
  done
}
for b in $benches; do
  case $b in
    forward)
      python3 -m crossmap.cli bench forward --model qwen2.5-7b-instruct --layer 20 --batch 32 --seq 1024 \
        --out "$out/forward-qwen2.5-7b.json"
      python3 -m crossmap.cli bench forward --model gemma-3-27b-it --layer 41 --batch 8 --seq 1024 \
        --out "$out/forward-gemma-3-27b.json" ;;
    ridge)
      python3 -m crossmap.cli bench ridge --out "$out/ridge.json" ;;
    verbalize)
      python3 -m crossmap.cli bench verbalize --preset 7b --out "$out/verbalize-qwen2.5-7b.json" ;;
    verbalize-sampled)  # how the paper config's verbalizers decode: temperature 0.7, nucleus 0.95
      python3 -m crossmap.cli bench verbalize --preset 7b --temperature 0.7 --top-p 0.95 \
        --out "$out/verbalize-qwen2.5-7b-sampled.json" ;;
    decode-paths)  # fused projections and the decode-attention kernel, each on and off, side by side (7B, greedy)
      python3 -m crossmap.cli bench verbalize --preset 7b --projections separate,fused --decode-attention reference,auto \
        --out "$out/verbalize-7b-decode-paths.json" ;;
    decode-paths-27b)  # the same at the 27B shape: the XLA path and the fast one (the logits compared by tokens only)
      python3 -m crossmap.cli bench verbalize --preset 27b --projections separate,fused --decode-attention reference,auto \
        --reps 2 --no-logit-error --out "$out/verbalize-27b-decode-paths.json" ;;
    decode-paths-no-triton-gemm)  # decode-paths with cuBLAS for every product (BENCHMARKS: o and down split-K in Triton)
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -m crossmap.cli bench verbalize --preset 7b \
        --projections separate,fused --decode-attention reference,auto --torch-device none --no-logit-error \
        --out "$out/verbalize-7b-decode-paths-no-triton-gemm.json" ;;
    verbalize-nla-fast)  # the release workload on the fast path (fused, kernel attention, cuBLAS), then features per
      # GPU-hour; TOKENIZERS as for paper (below)
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -m crossmap.cli bench verbalize --preset 7b --nla \
        --tokenizer "${TOKENIZERS:?}/qwen2.5" --projections fused --no-logit-error \
        --out "$out/verbalize-7b-nla-fast.json"
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -m crossmap.cli bench verbalize --preset 27b --nla \
        --tokenizer "$TOKENIZERS/gemma3" --projections fused --reps 1 --no-logit-error \
        --out "$out/verbalize-27b-nla-fast.json"
      python3 -m crossmap.cli bench features-per-hour --verbalize "$out/verbalize-7b-nla-fast.json" \
        "$out/verbalize-27b-nla-fast.json" --out "$out/features-per-hour-fast.json" ;;
    fast-scan)  # fused + kernel attention, unrolled and scanned in one run each, with the scanned decode's flags and
      # transformers' generate beside (greedy, both shapes)
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 7b --projections fused \
        --layers unrolled,scanned --out "$out/verbalize-7b-fast-scan.json"
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 27b --projections fused \
        --layers unrolled,scanned --reps 2 --no-logit-error --out "$out/verbalize-27b-fast-scan.json" ;;
    scan-kernel)  # the 27B scan's 3% and compile third with the kernel attention (separate projections), and what
      # the kernel and fusing change in each layout; the same flags
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 27b --layers unrolled,scanned \
        --reps 2 --no-logit-error --torch-device none --out "$out/verbalize-27b-scan-kernel-separate.json"
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 27b --projections fused \
        --decode-attention reference,auto --reps 1 --no-logit-error --torch-device none \
        --out "$out/verbalize-27b-fused-attention.json"
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 27b --layers scanned \
        --decode-attention reference,auto --reps 1 --no-logit-error --torch-device none \
        --out "$out/verbalize-27b-scanned-separate-attention.json" ;;
    stop-check)  # the stop test every step against every 4 and 16 (generate's stop_check_every), the fast path at
      # both shapes with the scanned decode's flags; then the 7B again with programmatic dependent launch
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 7b --projections fused \
        --stop-check-every 1,4,16 --torch-device none --no-logit-error --out "$out/verbalize-7b-stop-check.json"
      XLA_FLAGS="$scanned_flags --xla_gpu_enable_pdl=true" python3 -m crossmap.cli bench verbalize --preset 7b \
        --projections fused --stop-check-every 1,16 --torch-device none --no-logit-error \
        --out "$out/verbalize-7b-stop-check-pdl.json"
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 27b --projections fused \
        --stop-check-every 1,16 --reps 2 --torch-device none --no-logit-error --out "$out/verbalize-27b-stop-check.json" ;;
    step-kernel)  # the decode step's prologue and cache writes in the attention kernel (pallas-step) against the
      # attention-only kernel (pallas), the fast path at both shapes; BATCH_27B lowers the 27B batch where
      # 128 rows' cache does not fit beside the weights (an 80 GB card)
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -m crossmap.cli bench verbalize --preset 7b \
        --projections fused --decode-attention pallas,pallas-step --torch-device none \
        --out "$out/verbalize-7b-step-kernel.json"
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -m crossmap.cli bench verbalize --preset 27b \
        --batch "${BATCH_27B:-128}" --projections fused --decode-attention pallas,pallas-step --reps 2 \
        --torch-device none --no-logit-error --out "$out/verbalize-27b-step-kernel.json" ;;
    verbalize-27b)  # the Gemma-3-27B shape, bf16 and int8 kernels side by side
      python3 -m crossmap.cli bench verbalize --preset 27b --weights float,int8 \
        --out "$out/verbalize-gemma-3-27b.json" ;;
    verbalize-nla)  # the released AV/AR workload at both shapes, then features per GPU-hour from those two runs;
      # TOKENIZERS as for paper (below). The 27B runs unrolled and scanned, with the flags a scanned decode wants.
      python3 -m crossmap.cli bench verbalize --preset 7b --nla --tokenizer "${TOKENIZERS:?}/qwen2.5" \
        --out "$out/verbalize-qwen2.5-7b-nla.json"
      XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset 27b --nla \
        --tokenizer "$TOKENIZERS/gemma3" --layers unrolled,scanned --reps 2 --out "$out/verbalize-gemma-3-27b-nla.json"
      python3 -m crossmap.cli bench features-per-hour --verbalize "$out/verbalize-qwen2.5-7b-nla.json" \
        "$out/verbalize-gemma-3-27b-nla.json" --out "$out/features-per-hour.json" ;;
    scan)  # compile seconds and run time of unrolled and scanned blocks, side by side in one run each
      python3 -m crossmap.cli bench verbalize --preset 27b --layers unrolled,scanned --reps 2 \
        --out "$out/verbalize-27b-scan.json"
      python3 -m crossmap.cli bench forward --model gemma-3-27b-it --layer 41 --batch 8 --seq 1024 --no-torch \
        --layers unrolled,scanned --out "$out/forward-27b-scan.json"
      # with the flags a scanned decode wants: weights read in place from the stack
      for preset in 7b 27b; do
        XLA_FLAGS="$scanned_flags" python3 -m crossmap.cli bench verbalize --preset $preset --layers unrolled,scanned \
          --reps 2 --torch-device none --out "$out/verbalize-$preset-scan-xla-flags.json"
      done ;;
    int8)  # weight-only int8: decode beside bf16 at two batches, and each kernel's product with a tiling sweep
      for batch in 128 32; do
        python3 -m crossmap.cli bench verbalize --preset 7b --batch "$batch" --weights float,int8,int8:reference \
          --out "$out/verbalize-7b-int8-b$batch.json"
        python3 -m crossmap.cli bench int8-matmul --batch "$batch" --sweep gate_up,down,lm_head \
          --out "$out/int8-matmul-7b-b$batch.json"
      done ;;
    int8-fast)  # weight-only int8 on the fast path at two batches, the tilings of default_blocks for each; XLA's
      # own int8 product beside the kernel
      int8_fast_path float,int8,int8:reference int8-fast 32 128 ;;
    int8-mosaic)  # int8 with the wide products (gate/up, LM head) through JAX's Mosaic GPU kernel (Hopper), beside
      # the Triton kernel for every product, at two batches
      int8_fast_path float,int8,int8:mosaic int8-mosaic 128 32 ;;
    int8-f16)  # int8 with the Triton kernel multiplying in float16 (weights converted by integer operations, not
      # conversion instructions) beside the plain kernel, batch 32 first (the int8 target's nearest)
      int8_fast_path float,int8,int8:pallas-f16 int8-f16 32 128 ;;
    top-p)  # the nucleus filter alone at the 7B decode shape, against sort-and-cumsum
      python3 -m crossmap.cli bench top-p --out "$out/top-p-qwen2.5-7b.json" ;;
    paper)
      bash "$(dirname "$0")/gpu_node.sh" bench paper --source-tokenizer "${TOKENIZERS:?}/qwen2.5" \
        --target-tokenizer "$TOKENIZERS/gemma3" --embedder "${EMBEDDER:?}" --out "$out/paper.json" ;;
    scaling)
      bash "$(dirname "$0")/gpu_node.sh" bench scaling --repeats 3 --out "$out/scaling-gemma-3-27b.json"
      for chunk in 8192 32768; do
        bash "$(dirname "$0")/gpu_node.sh" bench scaling --parts ridge --layouts '[{"data": -1}]' \
          --ridge-chunk "$chunk" --out "$out/scaling-ridge-skip-$chunk.json"
      done ;;
  esac
done
