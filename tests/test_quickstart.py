"""The README's headline command, read from README.md, at smoke size: the quickstart line's
`python -m vim_jax.main ...` with `:smoke` added to its config, run from the root of a scratch
copy of the repository with the README's relative --workdir, as a new user types it. It runs
every stage, is stopped by SIGTERM between stages, and a rerun resumes the interrupted stage and
finishes, with every file and scalar in place. (.ci/run also runs the whole line, venv and
install included, in a fresh clone.)"""

import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import readme_commands
from run_files import cli_env, event_scalars


def test_quickstart_smoke_stops_between_stages_and_resumes(tmp_path):
  root = readme_commands.scratch_repository(str(tmp_path))
  command = readme_commands.quickstart_command(smoke=True)
  relative_workdir = next(a for a in command if a.startswith("--workdir=")).split("=", 1)[1]
  workdir = os.path.join(root, relative_workdir)  # where the run must write, and nowhere else
  env = cli_env()
  first_log = tmp_path / "first.log"
  with open(first_log, "w") as log:
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=log)
    start = time.time()
    while "quickstart: stage 1 (tokenizer) done" not in first_log.read_text():
      assert proc.poll() is None, first_log.read_text()[-3000:]
      assert time.time() - start < 600, "stage 1 did not finish"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the classifier is starting
    assert proc.wait(timeout=300) == 0, first_log.read_text()[-3000:]
  text = first_log.read_text()
  assert "stopped during classifier" in text and "rerun the same command to resume" in text
  stopped_at = [
      int(os.path.basename(p))
      for p in glob.glob(os.path.join(workdir, "classifier", "checkpoints", "[0-9]*"))
  ]
  assert len(stopped_at) == 1 and stopped_at[0] < 6
  assert not os.path.exists(os.path.join(workdir, "vim"))

  second = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
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
  assert os.path.exists(
      os.path.join(workdir, "tokenizer", "images", "reconstructions_00000006.png")
  )
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
  # The relative --workdir was resolved against the folder the command started in, and the
  # stage-2 run records its tokenizer's absolute path (read later from anywhere).
  vim_config = json.load(open(os.path.join(workdir, "vim", "config.json")))
  assert vim_config["tokenizer_workdir"] == os.path.join(workdir, "tokenizer")
