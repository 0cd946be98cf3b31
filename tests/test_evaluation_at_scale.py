"""The paper's evaluation as a slice runs it, at tiny size: `python -m vim_jax.evaluate` stopped
by SIGTERM and by SIGKILL and run again ends with the numbers of a straight run; on 2
processes (gloo on 127.0.0.1, one CPU device each, every process running the same command) it
writes the numbers and files of 1 process, and so does `python -m vim_jax.sample`."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT
from run_files import cli_env, free_port, start_processes

# 24 class-balanced samples in global batches of 4: 6 sampling units, then one rejection unit
# per class (the tiny VIM's 6 classes at acceptance 0.5: 8 candidates each).
NUM_SAMPLES, BATCH = 24, 4


def _evaluate_argv(vim_dir, classifier_dir, weights, out):
  return [
      sys.executable,
      "-m",
      "vim_jax.evaluate",
      f"--workdir={vim_dir}",
      f"--inception_weights={weights}",
      f"--num_samples={NUM_SAMPLES}",
      f"--batch_size={BATCH}",
      f"--classifier_workdir={classifier_dir}",
      "--acceptance=0.5",
      "--reference_images=8",
      f"--out={out}",
  ]


def _metrics(out) -> dict[str, float]:
  (path,) = glob.glob(os.path.join(out, "results_*.json"))
  return {k: v["value"] for k, v in json.load(open(path))["metrics"].items()}


@pytest.fixture(scope="module")
def straight(vim_dir, classifier_dir, inception_files, tmp_path_factory):
  """One uninterrupted evaluation, one process on one device: (its out folder, metrics)."""
  out = str(tmp_path_factory.mktemp("straight"))
  proc = subprocess.run(
      _evaluate_argv(vim_dir, classifier_dir, inception_files["flax"], out),
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=cli_env(),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = _metrics(out)
  assert {
      "class_accuracy",
      "class_accuracy_rejection0.5",
      "is_of_samples",
      "is_of_samples_rejection0.5",
  } <= set(metrics)
  assert not glob.glob(os.path.join(out, "progress_*"))  # removed once the results exist
  return out, metrics


def _stop_when(argv, progress_glob: str, count: int, signum, log_path):
  """Starts argv; once `count` files match progress_glob, sends signum. Returns the exit code
  and how many matched when it ended."""
  proc = subprocess.Popen(
      argv, cwd=REPO_ROOT, env=cli_env(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT
  )
  deadline = time.time() + 600
  while len(glob.glob(progress_glob)) < count and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  if proc.poll() is None:
    proc.send_signal(signum)
  return proc.wait(timeout=600)


def test_evaluation_stopped_by_sigterm_then_sigkill_resumes_to_the_straight_numbers(
    straight, vim_dir, classifier_dir, inception_files, tmp_path
):
  _, expected = straight
  out = str(tmp_path / "eval")
  argv = _evaluate_argv(vim_dir, classifier_dir, inception_files["flax"], out)
  shards = os.path.join(out, "progress_*", "*.npz")
  # SIGTERM once 2 sampling batches are saved: it finishes the batch at hand and exits 0.
  code = _stop_when(argv, shards, 2, signal.SIGTERM, tmp_path / "first.log")
  log = open(tmp_path / "first.log").read()
  assert code == 0 and "stopped by SIGTERM" in log, log[-3000:]
  first = len(glob.glob(shards))
  assert 2 <= first < 6 + 6 and not glob.glob(os.path.join(out, "results_*.json"))
  # Other settings would draw other samples: refused, rather than mixed with the saved ones.
  proc = subprocess.run(
      [*argv, "--seed=1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=cli_env()
  )
  assert proc.returncode != 0
  assert "holds the progress of another evaluation: seed was 0, now 1" in proc.stderr, proc.stderr[
      -2000:
  ]
  # SIGKILL in the rejection phase: nothing is said, the unit at hand is lost.
  code = _stop_when(
      argv,
      os.path.join(out, "progress_*", "rejection*.npz"),
      1,
      signal.SIGKILL,
      tmp_path / "second.log",
  )
  assert code == -signal.SIGKILL, open(tmp_path / "second.log").read()[-3000:]
  second = len(glob.glob(shards))
  assert first < second < 6 + 6
  assert f"resumed after {first} of 6 units" in open(tmp_path / "second.log").read()
  proc = subprocess.run(
      argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=cli_env()
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rejection0.5: resumed after" in proc.stderr and "ETA" in proc.stderr
  print(
      f"\nresumed evaluation: stopped after {first} and {second} of 12 units; metrics "
      f"{_metrics(out)}"
  )
  assert _metrics(out) == expected  # exactly: the same float64 sums in the same order
  assert not glob.glob(os.path.join(out, "progress_*"))


def test_two_processes_evaluate_and_sample_as_one(
    straight, vim_dir, classifier_dir, inception_files, tmp_path
):
  """Every process runs the same command; each device draws and featurizes its rows of every
  global batch; process 0 alone writes."""
  _, expected = straight
  out = str(tmp_path / "eval")
  port = free_port()
  distributed = lambda i, port: [
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
  ]
  argv = _evaluate_argv(vim_dir, classifier_dir, inception_files["flax"], out)
  logs = start_processes(
      2, lambda i: [*argv, *distributed(i, port)], str(tmp_path), devices_per_process=1
  )
  assert "process 1 of 2, 1 local / 2 global devices" in open(logs[1]).read()
  two = _metrics(out)
  print(f"\n2 processes vs 1: {two} vs {expected}")
  assert two.keys() == expected.keys()
  for key in ("class_accuracy", "class_accuracy_rejection0.5"):
    assert two[key] == expected[key], key
  for key in expected:  # each device featurizes 2 images instead of 4: float32 sums differ
    assert two[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
  assert len(glob.glob(os.path.join(out, "results_*.json"))) == 1

  sample = lambda folder: [
      sys.executable,
      "-m",
      "vim_jax.sample",
      f"--workdir={vim_dir}",
      "--num_samples=12",
      f"--batch_size={BATCH}",
      f"--out={folder}",
  ]
  one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
  proc = subprocess.run(
      sample(one_dir), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=cli_env()
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  port = free_port()
  os.makedirs(tmp_path / "sample_logs")
  start_processes(
      2,
      lambda i: [*sample(two_dir), *distributed(i, port)],
      str(tmp_path / "sample_logs"),
      devices_per_process=1,
  )
  one, two = (np.load(os.path.join(d, "samples.npz")) for d in (one_dir, two_dir))
  np.testing.assert_array_equal(one["labels"], two["labels"])
  np.testing.assert_array_equal(one["images"], two["images"])
  assert sorted(os.listdir(one_dir)) == sorted(os.listdir(two_dir))
