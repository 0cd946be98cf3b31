#!/usr/bin/env bash
# Stop the run on every worker with SIGTERM: each saves a checkpoint at the next step and exits
# 0, so launch/tpu_run.sh with the same arguments resumes.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b launch/tpu_stop.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
plan "send SIGTERM to vim_jax.main on all workers of ${TPU_NAME} (checkpoint, then exit)"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker=all \
  --command="pkill -TERM -f 'python -m vim_jax.main' || true"
