"""The README's headline command at smoke size: `python -m vim_jax.main
--config=configs/quickstart.py:smoke` runs every stage, is stopped by SIGTERM between stages,
and a rerun resumes the interrupted stage and finishes, with every file and scalar in place."""

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
from run_files import cli_env, event_scalars


def test_quickstart_smoke_stops_between_stages_and_resumes(tmp_path):
  workdir = str(tmp_path / "quickstart")
  command = [sys.executable, "-m", "vim_jax.main", "--config=configs/quickstart.py:smoke",
             f"--workdir={workdir}"]
  env = cli_env()
  first_log = tmp_path / "first.log"
  with open(first_log, "w") as log:
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    start = time.time()
    while "quickstart: stage 1 (tokenizer) done" not in first_log.read_text():
      assert proc.poll() is None, first_log.read_text()[-3000:]
      assert time.time() - start < 600, "stage 1 did not finish"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the classifier is starting
    assert proc.wait(timeout=300) == 0, first_log.read_text()[-3000:]
  text = first_log.read_text()
  assert "stopped during classifier" in text and "rerun the same command to resume" in text
  stopped_at = [int(os.path.basename(p)) for p in
                glob.glob(os.path.join(workdir, "classifier", "checkpoints", "[0-9]*"))]
  assert len(stopped_at) == 1 and stopped_at[0] < 6
  assert not os.path.exists(os.path.join(workdir, "vim"))

  second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  log = second.stderr
  assert f"checkpoint: restoring step {stopped_at[0]}" in log  # the classifier resumed
  assert "checkpoint: restoring step 6" in log  # the finished tokenizer was not retrained
  assert "quickstart finished" in log

  # Every stage's checkpoints, logs and grids.
  for stage, step in (("tokenizer", 6), ("classifier", 6), ("vim", 6)):
    assert os.path.isdir(os.path.join(workdir, stage, "checkpoints", str(step))), stage
    assert glob.glob(os.path.join(workdir, stage, "events.out.tfevents.*")), stage
    assert os.path.exists(os.path.join(workdir, stage, "config.json")), stage
  assert os.path.exists(os.path.join(workdir, "tokenizer", "images", "reconstructions_00000006.png"))
  assert os.path.exists(os.path.join(workdir, "vim", "images", "samples_00000006.png"))
  tokenizer = event_scalars(os.path.join(workdir, "tokenizer"))
  assert sorted(tokenizer["train/loss"]) == [3, 6] and 6 in tokenizer["eval/psnr"]
  assert sorted(event_scalars(os.path.join(workdir, "vim"))["train/loss"]) == [3, 6]

  # The samples and their scores: the file, the JSON and the TensorBoard scalars agree.
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (12, 32, 32, 3) and samples["images"].dtype == np.uint8
  np.testing.assert_array_equal(samples["labels"], np.arange(12) % 6)
  results = json.load(open(os.path.join(workdir, "samples", "results.json")))
  assert results["num_samples"] == 12
  sample_scalars = event_scalars(os.path.join(workdir, "samples"))
  for key in ("class_accuracy", "class_accuracy_rejection"):
    assert sample_scalars[f"sample/{key}"] == {6: pytest.approx(results[key], abs=1e-6)}, key
    assert abs(results[key] * 12 - round(results[key] * 12)) < 1e-9  # a count of 12 samples
