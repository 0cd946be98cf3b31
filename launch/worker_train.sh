#!/usr/bin/env bash
# Runs on each TPU worker, started by tpu_run.sh: one training process whose output is appended
# to ~/vim_jax.log (a header line per launch, an exit line at the end), then that log is copied
# to WORKDIR/logs/<hostname>.log so it survives the VM.
#   launch/worker_train.sh CONFIG WORKDIR TFDS_DATA_DIR [vim_jax.main arguments ...]
# VIM_ENV (default ~/vim_env) and VIM_JAX_LOG (default ~/vim_jax.log) can be changed.
set -uo pipefail
if (($# < 3)); then
  echo "usage: $0 CONFIG WORKDIR TFDS_DATA_DIR [vim_jax.main arguments ...]" >&2
  exit 2
fi
config="$1"
workdir="$2"
data_dir="$3"
shift 3
log="${VIM_JAX_LOG:-${HOME}/vim_jax.log}"
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=/dev/null
source "${VIM_ENV:-${HOME}/vim_env}/bin/activate"
echo "=== $(date -u +%FT%TZ) $(hostname) launch: --config=${config} --workdir=${workdir} $*" \
  >> "${log}"
TFDS_DATA_DIR="${data_dir}" python -m vim_jax.main --distributed=on --config="${config}" \
  --workdir="${workdir}" "$@" >> "${log}" 2>&1
status=$?
echo "=== $(date -u +%FT%TZ) exit ${status}" >> "${log}"
if ! error="$(gcloud storage cp -q "${log}" "${workdir}/logs/$(hostname).log" 2>&1)"; then
  echo "=== could not copy the log to ${workdir}/logs/: ${error}" >> "${log}"
fi
exit "${status}"
