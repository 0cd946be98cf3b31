#!/usr/bin/env bash
# Run one of the single-process commands (evaluate, sample, probe, tools.pretokenize) on a
# single-host slice, in the foreground, appending its output to ~/vim_jax_<command>.log.
#   TPU_NAME=vim-eval ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 \
#   launch/tpu_exec.sh evaluate --workdir=gs://BUCKET/runs/vitvq_base \
#     --inception_weights=gs://BUCKET/weights/pt_inception-2015-12-05.msgpack
# Why a single host: these commands start one JAX process (no jax.distributed), while on a
# multi-host slice every host must run the same program. A v4-8, v5p-8, v5e-8 or v6e-8 created
# next to the pod reads the same gs:// workdirs (VIM-Large's 1.85B params fit one host
# replicated).
# Optional: PROJECT, QUEUED / SPOT (as for tpu_create.sh), TFDS_DATA_DIR.
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE ACCELERATOR_TYPE
tpu_flags
command_name="${1:-}"
case "${command_name}" in
  evaluate | sample | probe | tools.pretokenize) shift ;;
  *)
    echo "error: first argument ${command_name:-(none)}: expected evaluate, sample, probe or" \
      "tools.pretokenize" >&2
    exit 2
    ;;
esac
size="${ACCELERATOR_TYPE##*-}"
if [[ ! "${size}" =~ ^[0-9]+$ || "${size}" -gt 8 || "${NUM_SLICES}" -gt 1 ]]; then
  echo "error: ACCELERATOR_TYPE=${ACCELERATOR_TYPE} (NUM_SLICES=${NUM_SLICES}) spans several" \
    "hosts; ${command_name} runs as one process. Create a single-host slice (v4-8, v5p-8," \
    "v5e-8 or v6e-8) that reads the same gs:// workdir, and run it there." >&2
  exit 2
fi
args=""
for a in "$@"; do
  args+=" $(printf '%q' "${a}")"
done
data_env=""
if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
  data_env="TFDS_DATA_DIR=$(printf '%q' "${TFDS_DATA_DIR}") "
fi
log_name="vim_jax_${command_name}.log"
remote="set -o pipefail; cd ~/vim_jax && . ~/vim_env/bin/activate && \
${data_env}python -m vim_jax.${command_name}${args} 2>&1 | tee -a ~/${log_name}"
plan "run vim_jax.${command_name} on ${TPU_NAME} (${ACCELERATOR_TYPE}); output also in" \
  "the home folder's ${log_name}"
NODE=0 tpu_ssh 0 "${remote}"
