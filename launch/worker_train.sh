#!/usr/bin/env bash
# Runs on each TPU worker, started by tpu_run.sh: one training process whose output is appended
# to ~/vim_jax.log (a header line per launch, an exit line at the end), then that log is copied
# to WORKDIR/logs/<hostname>.log so it survives the VM.
#   launch/worker_train.sh CONFIG WORKDIR TFDS_DATA_DIR [vim_jax.main arguments ...]
# VIM_ENV (default ~/vim_env) and VIM_JAX_LOG (default ~/vim_jax.log) can be changed; RESTARTS
# (below) opts into reruns after a failure.
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
# RESTARTS=N (default 0): rerun after a failed exit, up to N times, RESTART_DELAY seconds
# apart (default 60). Safe because a rerun resumes exactly from the last complete checkpoint.
# When a worker dies, JAX stops the others after --heartbeat_timeout; each then reruns and
# waits (up to 5 minutes) for every worker to join again, so a dead host costs N waits.
# launch/tpu_stop.sh signals this script too: no rerun after a stop.
restarts="${RESTARTS:-0}"
attempt=0
stopping=0
trap 'stopping=1' TERM
while true; do
  echo "=== $(date -u +%FT%TZ) $(hostname) launch: --config=${config} --workdir=${workdir} $*" \
    >> "${log}"
  TFDS_DATA_DIR="${data_dir}" python -m vim_jax.main --distributed=on --config="${config}" \
    --workdir="${workdir}" "$@" >> "${log}" 2>&1
  status=$?
  echo "=== $(date -u +%FT%TZ) exit ${status}" >> "${log}"
  if ((status == 0 || stopping || attempt >= restarts)); then
    break
  fi
  attempt=$((attempt + 1))
  echo "=== restart ${attempt} of ${restarts} in ${RESTART_DELAY:-60} s" >> "${log}"
  sleep "${RESTART_DELAY:-60}"
  if ((stopping)); then
    break
  fi
done
if ! error="$(gcloud storage cp -q "${log}" "${workdir}/logs/$(hostname).log" 2>&1)"; then
  echo "=== could not copy the log to ${workdir}/logs/: ${error}" >> "${log}"
fi
exit "${status}"
