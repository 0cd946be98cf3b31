#!/usr/bin/env bash
# Follow the training log of one worker (default worker 0 of slice 0, the one that writes
# summaries). Earlier launches are above in the same file; finished ones are also in
# WORKDIR/logs/.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b [WORKER=0] [NODE=0] launch/tpu_logs.sh
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
WORKER="${WORKER:-0}"
NODE="${NODE:-0}"
plan "follow ~/vim_jax.log on worker ${WORKER} of ${TPU_NAME} (Ctrl-C stops following, not the run)"
tpu_ssh "${WORKER}" "tail -n 100 -f ~/vim_jax.log"
