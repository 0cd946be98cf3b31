#!/usr/bin/env bash
# Run a config on every worker of the slice, in the background, logging to ~/vim_jax.log.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b CONFIG=configs/vitvq_base.py \
#   WORKDIR=gs://BUCKET/vitvq_base TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets \
#   launch/tpu_run.sh [--config.key=value ...]
# Extra arguments are passed to vim_jax.main. Rerunning the same command resumes.
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE CONFIG WORKDIR TFDS_DATA_DIR
tpu_flags
if [[ "${WORKDIR}" != gs://* ]]; then
  echo "error: WORKDIR=${WORKDIR} must be a gs:// path that every worker can write" >&2
  exit 2
fi
args=""
for a in "$@"; do
  args+=" $(printf '%q' "${a}")"
done
remote="cd ~/vim_jax && . ~/vim_env/bin/activate && \
TFDS_DATA_DIR=${TFDS_DATA_DIR} nohup python -m vim_jax.main --distributed=on \
--config=${CONFIG} --workdir=${WORKDIR}${args} > ~/vim_jax.log 2>&1 &"
plan "run ${CONFIG} on all workers of ${TPU_NAME}, workdir ${WORKDIR}, data ${TFDS_DATA_DIR}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker=all \
  --command="${remote}"
echo "logs: TPU_NAME=${TPU_NAME} ZONE=${ZONE} launch/tpu_logs.sh; TensorBoard: tensorboard --logdir ${WORKDIR}"
