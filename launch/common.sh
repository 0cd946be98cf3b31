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
