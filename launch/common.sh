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

# The gcloud flags every TPU command shares.
tpu_flags() {
  TPU_FLAGS=(--zone="${ZONE}")
  if [[ -n "${PROJECT:-}" ]]; then
    TPU_FLAGS+=(--project="${PROJECT}")
  fi
}

# The regex that finds our training processes. The brackets make it match
# "python -m vim_jax.main" but not the command line of the shell running pkill/pgrep, which
# holds the bracketed text itself.
TRAIN_PATTERN='[p]ython -m vim_jax[.]main'

# stop_command TIMEOUT_S: the remote script tpu_stop.sh runs on each worker. It sends SIGTERM
# to the training processes (each saves a checkpoint at the next step and exits 0) and waits
# until they have exited, so the checkpoint is committed when it returns; exit 1 on timeout.
stop_command() {
  local timeout_s="$1"
  printf '%s' "pkill -TERM -f '${TRAIN_PATTERN}' || { echo \"\$(hostname): no run\"; exit 0; }; \
for _ in \$(seq ${timeout_s}); do pgrep -f '${TRAIN_PATTERN}' >/dev/null || \
{ echo \"\$(hostname): stopped\"; exit 0; }; sleep 1; done; \
echo \"\$(hostname): still running after ${timeout_s} s\" >&2; exit 1"
}
