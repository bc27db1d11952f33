#!/usr/bin/env bash
# Run a crossmap config on several multi-GPU nodes: one process per node, started on every node
# (by SLURM: `srun --ntasks-per-node=1 launch/gpu_multinode.sh CONFIG ...`, or by hand with the
# three variables below).  jax.distributed joins the processes; the mesh spans every GPU.
#
#   JAX_COORDINATOR_ADDRESS=node0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 launch/gpu_multinode.sh configs/paper.py
set -euo pipefail
config=${1:?usage: launch/gpu_multinode.sh CONFIG [--config.FIELD=VALUE ...]}
shift
if [[ -n "${SLURM_PROCID:-}" && -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export JAX_COORDINATOR_ADDRESS="$head:${JAX_COORDINATOR_PORT:-12355}"
  export JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec crossmap run --distributed --config "$config" "$@"
