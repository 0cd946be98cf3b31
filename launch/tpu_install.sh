#!/usr/bin/env bash
# Install vim_jax and JAX for TPU on every worker of the slice.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b REPO=https://github.com/YOU/vim_jax.git \
#   launch/tpu_install.sh
# REPO: a git URL every worker can clone. Optional: PROJECT, REF (default main).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE REPO
tpu_flags
REF="${REF:-main}"
remote="set -e
python3 -m venv ~/vim_env
. ~/vim_env/bin/activate
pip install -q -U pip
pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
rm -rf ~/vim_jax && git clone -q ${REPO} ~/vim_jax && cd ~/vim_jax && git checkout -q ${REF}
pip install -q .
python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
plan "install ${REPO}@${REF} and jax[tpu] into ~/vim_env on every worker of ${TPU_NAME}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker=all \
  --command="${remote}"
