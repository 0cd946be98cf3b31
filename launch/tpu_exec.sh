#!/usr/bin/env bash
# Run evaluate, sample, probe or tools.pretokenize on a slice, in the foreground, appending each
# worker's output to its ~/vim_jax_<command>.log.
#   TPU_NAME=vim-v4-128 ZONE=us-central2-b ACCELERATOR_TYPE=v4-128 \
#   launch/tpu_exec.sh evaluate --workdir=gs://BUCKET/runs/vim_large \
#     --inception_weights=gs://BUCKET/weights/pt_inception-2015-12-05.msgpack
# On a single-host slice (v4-8, v5p-8, v5e-8, v6e-8) the command runs on worker 0. On a
# multi-host slice (or several slices) every worker runs the same command with
# --distributed=on, as training does: the work is split over every chip, process 0 writes the
# results, and a stage-2 evaluation that is stopped continues when the same line is run again.
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
workers=0
distributed_flag=""
if [[ ! "${size}" =~ ^[0-9]+$ || "${size}" -gt 8 || "${NUM_SLICES}" -gt 1 ]]; then
  workers=all
  distributed_flag=" --distributed=on"
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
${data_env}python -m vim_jax.${command_name}${distributed_flag}${args} 2>&1 | tee -a ~/${log_name}"
plan "run vim_jax.${command_name} on ${TPU_NAME} (${ACCELERATOR_TYPE}, worker ${workers});" \
  "output also in each worker's ~/${log_name}"
if [[ "${workers}" == "all" ]]; then
  tpu_ssh all "${remote}"
else
  NODE=0 tpu_ssh 0 "${remote}"
fi
