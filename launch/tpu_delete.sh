#!/usr/bin/env bash
# Delete the slice (a queued resource with all its slices when QUEUED, NUM_SLICES or SPOT say
# so). The GCS workdir stays. Stop the run first (launch/tpu_stop.sh) so it saves.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b launch/tpu_delete.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
plan "delete ${TPU_NAME} in ${ZONE}"
if [[ "${QUEUED}" == "1" ]]; then
  run gcloud compute tpus queued-resources delete "${TPU_NAME}" "${TPU_FLAGS[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${TPU_FLAGS[@]}" --quiet
fi
