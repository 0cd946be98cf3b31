#!/usr/bin/env bash
# Create a TPU VM pod slice.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 launch/tpu_create.sh
# Optional: PROJECT, RUNTIME_VERSION (default tpu-ubuntu2204-base), SPOT=1 (preemptible).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE ACCELERATOR_TYPE
tpu_flags
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
extra=()
if [[ "${SPOT:-0}" == "1" ]]; then
  extra+=(--spot)
fi
plan "create TPU ${TPU_NAME} (${ACCELERATOR_TYPE}, ${RUNTIME_VERSION}) in ${ZONE}"
run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${TPU_FLAGS[@]}" \
  --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${extra[@]}"
