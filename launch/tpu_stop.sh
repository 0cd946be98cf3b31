#!/usr/bin/env bash
# Stop the run on every worker with SIGTERM: each saves a checkpoint at the next step and exits
# 0, so launch/tpu_run.sh with the same arguments resumes. Returns once every worker's process
# has exited (the checkpoint is then committed), or fails after STOP_TIMEOUT seconds.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b launch/tpu_stop.sh
# Optional: PROJECT, STOP_TIMEOUT (default 600), QUEUED / NUM_SLICES / SPOT (as for tpu_create.sh).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
STOP_TIMEOUT="${STOP_TIMEOUT:-600}"
plan "send SIGTERM to vim_jax.main on all workers of ${TPU_NAME}; wait up to ${STOP_TIMEOUT} s" \
  "for the final checkpoint"
tpu_ssh all "$(stop_command "${STOP_TIMEOUT}")"
