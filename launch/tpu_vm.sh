#!/usr/bin/env bash
# Run dpft on every worker of a Cloud TPU VM (pod slice) through gcloud.
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]
#
# Each worker runs the same `dpft train`; jax.distributed.initialize() (called by dpft when
# TPU_WORKER_HOSTNAMES lists several hosts) finds the other workers itself. WORKDIR should be
# shared storage visible to every worker: a gs://BUCKET/RUN URL (pip install 'dpft[gcs]'; see the
# README's "Cloud paths") or a mounted NFS/Filestore path, so that checkpoints are visible to all workers.
# Data roots (--config.data.root=gs://...) and --config.model.checkpoint=gs://... work the same way.
#
# Environment:
#   DPFT_PROJECT   GCP project (default: gcloud's configured one)
#   DPFT_REMOTE_DIR  checkout on the workers (default: ~/dpft), with its .venv
#   DPFT_DRY_RUN   if non-empty, print the gcloud command instead of running it
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4

remote_dir=${DPFT_REMOTE_DIR:-'~/dpft'}
train=$(printf '%q ' dpft train --config "$config" --workdir "$workdir" "$@")
remote="cd $remote_dir && source .venv/bin/activate && PYTHONUNBUFFERED=1 $train"

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
if [[ -n ${DPFT_PROJECT:-} ]]; then
  cmd+=(--project "$DPFT_PROJECT")
fi
if [[ -n ${DPFT_DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
