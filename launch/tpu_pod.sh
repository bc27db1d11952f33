#!/usr/bin/env bash
# Run a crossmap config on a TPU pod slice: the same command on every host of the slice (one
# process per host); jax.distributed finds the slice's coordinator by itself on TPU VMs.
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/paper.py --config.models.source.path=/gcs-fuse/Qwen2.5-7B-Instruct
#
# Weights, the corpus and the run directory must be visible at the same path on every host
# (a shared disk or gcsfuse mount). Multi-host runs are untested on real slices so far (no TPU was
# available to the developers); the single-host and 8-device CPU paths are tested.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.FIELD=VALUE ...]}
zone=${2:?zone}
config=${3:?config}
shift 3
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/crossmap && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 crossmap run --distributed --config $config$overrides"
