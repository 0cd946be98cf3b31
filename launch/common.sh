#!/usr/bin/env bash
# Shared helpers for the launch scripts: required variables, a plan printed before acting,
# and DRY_RUN=1 to print the commands without running them.
set -euo pipefail

# require VAR...: stop with a message naming every missing variable.
require() {
  local missing=()
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      missing+=("${name}")
    fi
  done
  if ((${#missing[@]})); then
    echo "error: set ${missing[*]} (see launch/README.md), e.g." >&2
    for name in "${missing[@]}"; do
      echo "  export ${name}=..." >&2
    done
    exit 2
  fi
}

# plan LINE...: say what the script is about to do.
plan() {
  echo "==> $*"
}

# run CMD...: print the command, then run it unless DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "${DRY_RUN:-0}" != "1" ]]; then
    "$@"
  fi
}

# The gcloud flags every TPU command shares, and whether the slice is a queued resource:
# QUEUED=1, NUM_SLICES>1 (multi-slice needs one) or SPOT=1 (Spot capacity is queued). Every
# script derives this the same way from the same exported variables.
tpu_flags() {
  TPU_FLAGS=(--zone="${ZONE}")
  if [[ -n "${PROJECT:-}" ]]; then
    TPU_FLAGS+=(--project="${PROJECT}")
  fi
  NUM_SLICES="${NUM_SLICES:-1}"
  if [[ "${QUEUED:-0}" == "1" || "${NUM_SLICES}" -gt 1 || "${SPOT:-0}" == "1" ]]; then
    QUEUED=1
  else
    QUEUED=0
  fi
}

# gcloud_accelerator TYPE: the accelerator type gcloud expects (v5e-N is called v5litepod-N).
gcloud_accelerator() {
  local type="$1"
  echo "${type/#v5e-/v5litepod-}"
}

# runtime_for TYPE: the TPU VM software version for a generation, or RUNTIME_VERSION if set.
runtime_for() {
  local type
  type="$(gcloud_accelerator "$1")"
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    echo "${RUNTIME_VERSION}"
    return
  fi
  case "${type}" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *)
      echo "error: ACCELERATOR_TYPE=$1: expected v4-N, v5e-N (v5litepod-N), v5p-N or v6e-N," \
        "or set RUNTIME_VERSION" >&2
      return 2
      ;;
  esac
}

# tpu_ssh WORKERS COMMAND: run COMMAND on WORKERS (all, or an index) of the slice; for a queued
# resource, on every slice (NODE=all) unless NODE names one.
tpu_ssh() {
  local workers="$1" command="$2"
  if [[ "${QUEUED}" == "1" ]]; then
    run gcloud compute tpus queued-resources ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" \
      --node="${NODE:-all}" --worker="${workers}" --command="${command}"
  else
    run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker="${workers}" \
      --command="${command}"
  fi
}

# tpu_scp_all FILE: copy a local file to the home folder of every worker (every slice).
tpu_scp_all() {
  local file="$1"
  if [[ "${QUEUED}" == "1" ]]; then
    run gcloud compute tpus queued-resources scp "${file}" "${TPU_NAME}:" "${TPU_FLAGS[@]}" \
      --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "${file}" "${TPU_NAME}:" "${TPU_FLAGS[@]}" --worker=all
  fi
}

# The regex that finds our training processes. The brackets make it match
# "python -m vim_jax.main" but not the command line of the shell running pkill/pgrep, which
# holds the bracketed text itself.
TRAIN_PATTERN='[p]ython -m vim_jax[.]main'
# The worker script around it (launch/worker_train.sh), told not to rerun (RESTARTS).
WORKER_PATTERN='[l]aunch/worker_train[.]sh'

# stop_command TIMEOUT_S: the remote script tpu_stop.sh runs on each worker. It sends SIGTERM
# to the training processes (each saves a checkpoint at the next step and exits 0) and waits
# until they have exited, so the checkpoint is committed when it returns; exit 1 on timeout.
stop_command() {
  local timeout_s="$1"
  printf '%s' "pkill -TERM -f '${WORKER_PATTERN}'; pkill -TERM -f '${TRAIN_PATTERN}' || { echo \"\$(hostname): no run\"; exit 0; }; \
for _ in \$(seq ${timeout_s}); do pgrep -f '${TRAIN_PATTERN}' >/dev/null || \
{ echo \"\$(hostname): stopped\"; exit 0; }; sleep 1; done; \
echo \"\$(hostname): still running after ${timeout_s} s\" >&2; exit 1"
}
