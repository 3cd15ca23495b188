#!/usr/bin/env bash
# Run dpft on every worker of a Cloud TPU VM (a single host or a multi-host pod slice) through gcloud.
#
#   launch/tpu_vm.sh install TPU_NAME ZONE                                     # once: the code on every worker
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]   # start training
#   launch/tpu_vm.sh logs TPU_NAME ZONE WORKDIR [WORKER]                        # follow a worker's log (default 0)
#
# install: packs this checkout (`git archive HEAD`), copies it to every worker (`tpu-vm scp
# --worker=all`), unpacks it into DPFT_REMOTE_DIR and makes a virtual environment there with
# `pip install -e '.[gcs]' 'jax[tpu]'`. Rerun it after changing the code (commit first: only HEAD
# is packed).
#
# train: every worker runs the same `dpft train` with DPFT_CLUSTER=tpu, which makes dpft call
# jax.distributed.initialize(); jax reads the slice's workers and this worker's index from the TPU
# metadata server (on GKE, TPU_WORKER_HOSTNAMES does the same without this script). The run is
# detached from the ssh session (setsid + nohup, input from /dev/null), so a dropped connection
# (SIGHUP) does not stop it; its output goes to ~/dpft-logs/<WORKDIR's last component>.log on each
# worker (see `logs`). Rerunning the same command resumes from the last checkpoint.
# WORKDIR must be storage every worker sees: a gs://BUCKET/RUN URL (credentials: the TPU VM's
# service account) or a mounted NFS/Filestore path. Data roots (--config.data.root=gs://...) and
# --config.model.checkpoint=gs://... work the same way.
#
# Environment:
#   DPFT_PROJECT     GCP project (default: gcloud's configured one)
#   DPFT_REMOTE_DIR  checkout on the workers (default: ~/dpft), with its .venv
#   DPFT_DRY_RUN     if non-empty, print the gcloud command(s) instead of running them
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]" >&2
  echo "       $0 install TPU_NAME ZONE" >&2
  echo "       $0 logs TPU_NAME ZONE WORKDIR [WORKER]" >&2
  exit 2
}

remote_dir=${DPFT_REMOTE_DIR:-'~/dpft'}
project=()
if [[ -n ${DPFT_PROJECT:-} ]]; then
  project=(--project "$DPFT_PROJECT")
fi

run() {  # run (or, with DPFT_DRY_RUN, print) one gcloud command
  if [[ -n ${DPFT_DRY_RUN:-} ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

case ${1:-} in
  install)
    [[ $# -eq 3 ]] || usage
    tpu=$2; zone=$3
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    setup="mkdir -p $remote_dir && tar -xzf ~/dpft-src.tar.gz -C $remote_dir && cd $remote_dir"
    setup+=" && python3 -m venv .venv && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'"
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:~/dpft-src.tar.gz" --zone "$zone" --worker=all \
        "${project[@]}"
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$setup" "${project[@]}"
    exit 0
    ;;
  logs)
    [[ $# -ge 4 && $# -le 5 ]] || usage
    tpu=$2; zone=$3; name=$(basename "${4%/}"); worker=${5:-0}
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker="$worker" \
        --command "tail -n +1 -F ~/dpft-logs/$name.log" "${project[@]}"
    exit 0
    ;;
esac

[[ $# -ge 4 ]] || usage
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4

name=$(basename "${workdir%/}")
train=$(printf '%q ' dpft train --config "$config" --workdir "$workdir" "$@")
# Detached from the ssh session: SIGHUP ignored from the first command on (inherited by the run, so
# a connection that drops while it starts cannot stop it), then setsid (own session, no controlling
# terminal) and nohup; the launching shell returns once every worker has started its run.
inner="cd $remote_dir && source .venv/bin/activate && export DPFT_CLUSTER=tpu PYTHONUNBUFFERED=1 && exec $train"
remote="trap '' HUP; mkdir -p ~/dpft-logs && setsid nohup bash -c $(printf '%q' "$inner") > ~/dpft-logs/$name.log 2>&1 < /dev/null &"
remote+=" echo \"worker \$(hostname): started; log ~/dpft-logs/$name.log\""

run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote" "${project[@]}"
