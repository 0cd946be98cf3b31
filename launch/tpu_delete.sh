#!/usr/bin/env bash
# Delete the slice (stop the run first with launch/tpu_stop.sh; the workdir on GCS stays).
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b launch/tpu_delete.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
plan "delete TPU ${TPU_NAME} in ${ZONE}"
run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${TPU_FLAGS[@]}" --quiet
