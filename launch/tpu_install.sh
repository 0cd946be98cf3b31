#!/usr/bin/env bash
# Install this checkout of vim_jax, Python 3.11 and JAX for TPU on every worker.
#   TPU_NAME=vim-v4-8 ZONE=us-central2-b launch/tpu_install.sh
# The code travels as a `git archive` of HEAD (no public git URL needed), copied to every
# worker; commit what you want to run. TPU VM images ship Python 3.10, and jax 0.10 needs
# >= 3.11, so uv provides 3.11 in the venv ~/vim_env. `.[tpu]` installs jax[tpu] in the same
# resolve as the package, so jax and libtpu always match.
# Optional: PROJECT, QUEUED / NUM_SLICES / SPOT (as for tpu_create.sh).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE
tpu_flags
repo="$(cd "$(dirname "$0")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/vim_jax.tar.gz"
commit="$(git -C "${repo}" rev-parse --short HEAD)"
if [[ -n "$(git -C "${repo}" status --porcelain --untracked-files=no)" ]]; then
  echo "warning: uncommitted changes in ${repo} are not shipped (git archive of ${commit})" >&2
fi
remote="set -e
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || python3 -m pip install -q --user uv
rm -rf ~/vim_env ~/vim_jax && mkdir ~/vim_jax && tar -xzf ~/vim_jax.tar.gz -C ~/vim_jax
uv venv -q --python 3.11 ~/vim_env
. ~/vim_env/bin/activate
cd ~/vim_jax && uv pip install -q '.[tpu]' \
  --find-links https://storage.googleapis.com/jax-releases/libtpu_releases.html
python -c 'import jax; print(jax.__version__, jax.process_index(), jax.local_device_count(), jax.device_count())'"
plan "ship ${repo} at ${commit} and install it with Python 3.11 and jax[tpu] into ~/vim_env" \
  "on every worker of ${TPU_NAME}"
run git -C "${repo}" archive --format=tar.gz -o "${tarball}" HEAD
tpu_scp_all "${tarball}"
tpu_ssh all "${remote}"
