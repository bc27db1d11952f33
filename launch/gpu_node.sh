#!/usr/bin/env bash
# Run a crossmap config on one multi-GPU node: one process drives every local GPU, the mesh
# spans them all (configs set mesh.tensor; -1 on mesh.data takes the rest).
#
#   launch/gpu_node.sh configs/paper.py --config.models.source.path=/ckpt/Qwen2.5-7B-Instruct ...
#
# Several nodes: run launch/gpu_multinode.sh on every node instead.
set -euo pipefail
config=${1:?usage: launch/gpu_node.sh CONFIG [--config.FIELD=VALUE ...]}
shift
# NVLink multicast (NVLS) off: it has hung collectives on shared machines; plain NVLink rings are
# as fast for the all-reduces crossmap does.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Let XLA take most of each GPU up front (a 27B model in bf16 plus activations).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
exec crossmap run --config "$config" "$@"
