"""Preemption through `python -m vim_jax.main`: SIGTERM saves and exits 0, SIGKILL mid-save
keeps the previous checkpoint. Each interrupted run, resumed, must end with exactly the
parameters of an uninterrupted run. (Corrupt checkpoints: tests/test_train_vitvq.py.)"""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from vim_jax import runs

STEPS = 10


def _command(workdir, checkpoint_every=1000):
  return [sys.executable, "-m", "vim_jax.main", "--config=configs/vitvq_base.py:tiny",
          f"--workdir={workdir}", f"--config.total_steps={STEPS}", "--config.log_every=1",
          "--config.eval_every=1000", f"--config.checkpoint_every={checkpoint_every}",
          "--config.num_eval_images=16", "--config.loss.adversarial=0"]


def _params(workdir):
  tok = runs.load_tokenizer(workdir)
  assert tok.step == STEPS
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          __import__("flax").traverse_util.flatten_dict(tok.params).items()}


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
  saved = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints",
                                                                    "[0-9]*"))]
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
    proc = subprocess.Popen(_command(workdir, checkpoint_every=1), cwd=REPO_ROOT,
                            stdout=log_file, stderr=log_file)
    # Kill while a save is being written, once an earlier one has completed.
    _wait_for(lambda: finished() and in_progress(), proc)
    proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert finished(), "no complete checkpoint survived"
  subprocess.run(_command(workdir, checkpoint_every=1), cwd=REPO_ROOT, check=True,
                 capture_output=True, timeout=900)
  assert not in_progress(), "the partial save was not cleaned up"
  _assert_same_params(_params(workdir), uninterrupted)
