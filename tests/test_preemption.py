"""Preemption through `python -m vim_jax.main`: SIGTERM saves and exits 0, SIGKILL mid-save
keeps the previous checkpoint. Each interrupted run, resumed, must end with exactly the
parameters of an uninterrupted run. (Corrupt checkpoints: tests/test_tokenizer_trainer.py.)"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT

from vim_jax.infra import runs

STEPS = 10


def _command(workdir, checkpoint_every=1000):
  return [
      sys.executable,
      "-m",
      "vim_jax.main",
      "--config=configs/vitvq_base.py:tiny",
      f"--workdir={workdir}",
      f"--config.total_steps={STEPS}",
      "--config.log_every=1",
      "--config.eval_every=1000",
      f"--config.checkpoint_every={checkpoint_every}",
      "--config.num_eval_images=16",
      "--config.loss.adversarial=0",
  ]


def _params(workdir):
  tok = runs.load_tokenizer(workdir)
  assert tok.step == STEPS
  return {
      "/".join(map(str, k)): np.asarray(v)
      for k, v in __import__("flax").traverse_util.flatten_dict(tok.params).items()
  }


def _assert_same_params(a, b):
  assert a.keys() == b.keys()
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  assert diff == 0.0, f"max parameter difference {diff}"


def _wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, "the run ended before the condition was met"
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  subprocess.run(_command(workdir), cwd=REPO_ROOT, check=True, capture_output=True, timeout=900)
  return _params(workdir)


def test_sigterm_saves_exits_zero_and_resume_is_exact(uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "log.txt"
  with open(log_path, "w") as log_file:
    proc = subprocess.Popen(_command(workdir), cwd=REPO_ROOT, stdout=log_file, stderr=log_file)
    _wait_for(lambda: f"step 3/{STEPS}" in log_path.read_text(), proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    seconds = time.time() - sent
  log = log_path.read_text()
  assert rc == 0, log[-3000:]
  print(f"\nSIGTERM to exit: {seconds:.2f} s")
  assert "stop requested: saved step" in log
  saved = [
      int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))
  ]
  assert len(saved) == 1 and 3 <= saved[0] < STEPS
  subprocess.run(_command(workdir), cwd=REPO_ROOT, check=True, capture_output=True, timeout=900)
  _assert_same_params(_params(workdir), uninterrupted)


def test_sigkill_mid_save_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  listing = lambda: os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  in_progress = lambda: [n for n in listing() if "tmp" in n]
  finished = lambda: [n for n in listing() if n.isdigit()]
  with open(tmp_path / "log.txt", "w") as log_file:
    proc = subprocess.Popen(
        _command(workdir, checkpoint_every=1), cwd=REPO_ROOT, stdout=log_file, stderr=log_file
    )
    # Kill while a save is being written, once an earlier one has completed.
    _wait_for(lambda: finished() and in_progress(), proc)
    proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert finished(), "no complete checkpoint survived"
  subprocess.run(
      _command(workdir, checkpoint_every=1),
      cwd=REPO_ROOT,
      check=True,
      capture_output=True,
      timeout=900,
  )
  assert not in_progress(), "the partial save was not cleaned up"
  _assert_same_params(_params(workdir), uninterrupted)


_SYNC_SCRIPT = """
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from vim_jax.infra import preemption
preemption.install_preemption_handler()
step = 0
while step < 3000:
  step += 1
  time.sleep(0.01)  # a train step
  if step == 20:
    print("running", flush=True)
  if preemption.preemption_requested(step):
    print(f"saving at step {step}", flush=True)
    break
print("stopped for preemption:", preemption.stopped_for_preemption(), flush=True)
jax.distributed.shutdown()
"""


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption service: the SIGTERM one process gets reaches the other, and both
  processes' checks agree on the step to save at, with no host collective on the steps."""
  import socket

  from run_files import cli_env

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _SYNC_SCRIPT, address, str(i)],
          cwd=REPO_ROOT,
          env=cli_env(1),
          stdout=open(logs[i], "w"),
          stderr=subprocess.STDOUT,
      )
      for i in range(2)
  ]
  try:
    _wait_for(lambda: all("running" in log.read_text() for log in logs), procs[1], timeout=120)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], texts
  steps = [int(re.search(r"saving at step (\d+)", t).group(1)) for t in texts]
  assert steps[0] == steps[1] and 20 <= steps[0] < 3000, steps
  assert all("stopped for preemption: True" in t for t in texts)
