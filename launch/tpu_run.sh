#!/usr/bin/env bash
# Run a config on every worker of the slice (every slice of a multi-slice queued resource), in
# the background.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b CONFIG=configs/vitvq_base.py \
#   WORKDIR=gs://BUCKET/vitvq_base TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets \
#   launch/tpu_run.sh [--config.key=value ...]
# Extra arguments are passed to vim_jax.main. Rerunning the same command resumes.
# Logs: each worker appends to ~/vim_jax.log (a header line per launch) and, when the process
# ends, copies that log to WORKDIR/logs/<hostname>.log (launch/worker_train.sh). Optional: PROJECT,
# QUEUED / NUM_SLICES / SPOT (as for tpu_create.sh), RESTARTS=N (each worker reruns after a
# failure, up to N times; launch/README.md, "When a worker dies").
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
# launch/worker_train.sh (shipped by tpu_install.sh) appends the log and copies it to WORKDIR.
remote="nohup env RESTARTS=$(printf '%q' "${RESTARTS:-0}") bash ~/vim_jax/launch/worker_train.sh \
$(printf '%q %q %q' "${CONFIG}" "${WORKDIR}" "${TFDS_DATA_DIR}")${args} > /dev/null 2>&1 &"
plan "run ${CONFIG} on all workers of ${TPU_NAME}, workdir ${WORKDIR}, data ${TFDS_DATA_DIR}"
tpu_ssh all "${remote}"
echo "logs: TPU_NAME=${TPU_NAME} ZONE=${ZONE} launch/tpu_logs.sh; TensorBoard: tensorboard --logdir ${WORKDIR}"
