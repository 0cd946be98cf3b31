#!/usr/bin/env bash
# Follow the training log of one worker (default 0, the one that writes summaries).
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b [WORKER=0] launch/tpu_logs.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
WORKER="${WORKER:-0}"
plan "follow ~/vim_jax.log on worker ${WORKER} of ${TPU_NAME} (Ctrl-C stops following, not the run)"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker="${WORKER}" \
  --command="tail -n 100 -f ~/vim_jax.log"
