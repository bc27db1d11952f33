#!/usr/bin/env bash
# Run crossmap on one multi-GPU node: one process drives every local GPU and the mesh spans them all
# (configs set mesh.tensor; -1 on mesh.data takes the rest).
#
#   launch/gpu_node.sh configs/paper.py --config.models.source.path=/ckpt/Qwen2.5-7B-Instruct ...
#   launch/gpu_node.sh bench scaling --out scaling.json      # any other crossmap command
#
# Several nodes: run launch/gpu_multinode.sh on every node instead.
set -euo pipefail
first=${1:?usage: launch/gpu_node.sh CONFIG.py [--config.FIELD=VALUE ...] | COMMAND [ARGS ...]}
# NVLink multicast (NVLS) off: on shared machines it has taken GPUs out of service; plain NVLink
# rings are as fast for the all-reduces crossmap does.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Let XLA take most of each GPU up front (a 27B model in bf16 plus activations).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
crossmap=(crossmap)
command -v crossmap >/dev/null || crossmap=(python3 -m crossmap.cli)  # run from a checkout, not installed
if [[ $first == *.py ]]; then
  shift
  exec "${crossmap[@]}" run --config "$first" "$@"
fi
exec "${crossmap[@]}" "$@"
