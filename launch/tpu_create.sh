#!/usr/bin/env bash
# Create a TPU VM pod slice, directly or as a queued resource.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 launch/tpu_create.sh
#   TPU_NAME=vim-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 QUEUED=1 launch/tpu_create.sh
# ACCELERATOR_TYPE: v4-N, v5e-N (= v5litepod-N), v5p-N or v6e-N; the runtime version follows
# from it (RUNTIME_VERSION overrides). Optional: PROJECT; QUEUED=1 (a queued resource: waits
# for capacity instead of failing); NUM_SLICES=K (multi-slice, K slices named TPU_NAME-0 ..;
# always queued); SPOT=1 (Spot capacity, queued; preempted VMs are deleted, see README);
# AUTOCHECKPOINT=1 (queued, gcloud alpha: maintenance events send SIGTERM, so the run saves).
# A queued resource is created asynchronously: watch it with
#   gcloud compute tpus queued-resources describe TPU_NAME --zone=ZONE   (until ACTIVE)
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE ACCELERATOR_TYPE
tpu_flags
accelerator="$(gcloud_accelerator "${ACCELERATOR_TYPE}")"
runtime="$(runtime_for "${ACCELERATOR_TYPE}")"
if [[ "${AUTOCHECKPOINT:-0}" == "1" ]]; then
  QUEUED=1
fi
if [[ "${QUEUED}" == "0" ]]; then
  plan "create TPU ${TPU_NAME} (${accelerator}, ${runtime}) in ${ZONE}"
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${TPU_FLAGS[@]}" \
    --accelerator-type="${accelerator}" --version="${runtime}"
  exit 0
fi
gcloud_cmd=(gcloud compute tpus queued-resources create "${TPU_NAME}")
extra=()
if [[ "${NUM_SLICES}" -gt 1 ]]; then
  extra+=(--node-count="${NUM_SLICES}" --node-prefix="${TPU_NAME}")
else
  extra+=(--node-id="${TPU_NAME}")
fi
if [[ "${SPOT:-0}" == "1" ]]; then
  extra+=(--spot)
fi
if [[ "${AUTOCHECKPOINT:-0}" == "1" ]]; then
  gcloud_cmd=(gcloud alpha compute tpus queued-resources create "${TPU_NAME}")
  extra+=(--autocheckpoint-enabled)
fi
plan "queue ${NUM_SLICES} x ${accelerator} (${runtime}) as ${TPU_NAME} in ${ZONE}" \
  "(spot: ${SPOT:-0}, autocheckpoint: ${AUTOCHECKPOINT:-0})"
run "${gcloud_cmd[@]}" "${TPU_FLAGS[@]}" --accelerator-type="${accelerator}" \
  --runtime-version="${runtime}" "${extra[@]}"
echo "queued; wait for state ACTIVE: gcloud compute tpus queued-resources describe ${TPU_NAME}" \
  "--zone=${ZONE}"
