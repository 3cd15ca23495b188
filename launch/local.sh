#!/usr/bin/env bash
# Train on one host with all of its devices (CPU, one or more GPUs, or a single TPU VM).
#
#   launch/local.sh CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]
#   launch/local.sh configs/digits_demo.py /tmp/digits --config.privacy.epsilon=2
#
# Environment:
#   DPFT          the dpft executable (default: dpft on PATH)
#   DPFT_DRY_RUN  if non-empty, print the command instead of running it
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2

cmd=("${DPFT:-dpft}" train --config "$config" --workdir "$workdir" "$@")
if [[ -n ${DPFT_DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
case $workdir in
  *://*) ;;  # gs://, s3://, az://: an object store (dpft writes it through etils.epath); no local folder
  *) mkdir -p "$workdir" ;;
esac
exec "${cmd[@]}"
