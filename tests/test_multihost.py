"""Multi-host: 2 processes on 127.0.0.1 (4 virtual CPU devices each, gloo collectives) run the
tiny stage-1 and stage-2 configs through `python -m vim_jax.main` and must match a
1-process, 8-device run of the same config: the logged losses and the final parameters."""

import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO_ROOT
from vim_jax import runs

STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return env


def _run_single(args, workdir, log_dir):
  with open(os.path.join(log_dir, "single.log"), "w") as log:
    proc = subprocess.run([sys.executable, "-m", "vim_jax.main", *args, f"--workdir={workdir}"],
                          cwd=REPO_ROOT, env=_env(8), stdout=log, stderr=log, timeout=900)
  assert proc.returncode == 0, open(os.path.join(log_dir, "single.log")).read()[-3000:]


def _run_two_processes(args, workdir, log_dir):
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    logs.append(os.path.join(log_dir, f"process{i}.log"))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "vim_jax.main", *args, f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO_ROOT, env=_env(4), stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, log in zip(codes, logs):
    assert code == 0, open(log).read()[-3000:]
  assert "process 1 of 2, 4 local / 8 global devices" in open(logs[1]).read()


def _losses(workdir):
  """train/loss per step from the TensorBoard events process 0 wrote."""
  import tensorflow as tf
  losses = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def _max_diff(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  return max(float(np.max(np.abs(np.asarray(fa[k]) - np.asarray(fb[k])))) for k in fa)


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost1")
  args = ["--config=configs/vitvq_base.py:tiny", f"--config.total_steps={STEPS}",
          "--config.log_every=1", "--config.eval_every=1000", "--config.checkpoint_every=1000",
          "--config.num_eval_images=16"]
  _run_single(args, str(root / "single"), str(root))
  _run_two_processes(args, str(root / "multi"), str(root))
  return str(root / "single"), str(root / "multi")


def test_stage1_two_processes_match_one(stage1_runs):
  single, multi = stage1_runs
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == list(range(1, STEPS + 1)) and a.keys() == b.keys()
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step
  diff = _max_diff(runs.load_tokenizer(single).params, runs.load_tokenizer(multi).params)
  print(f"\nstage 1, 2 processes vs 1: max parameter difference {diff:.3g}")
  assert diff < 1e-5


def test_stage2_two_slices_fsdp_tensor_match_one(stage1_runs, tmp_path):
  single_tok, _ = stage1_runs
  args = ["--config=configs/vim_base.py:tiny", f"--config.tokenizer_workdir={single_tok}",
          f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.eval_every=1000",
          "--config.checkpoint_every=1000", "--config.mesh.data=2", "--config.mesh.fsdp=2",
          "--config.mesh.tensor=2"]
  _run_single(args, str(tmp_path / "single"), str(tmp_path))
  # The same global mesh built as 2 "slices" (one per process) joined over DCN on the data
  # axis: data = 1 (in-slice) x 2 (across).
  _run_two_processes(args + ["--config.mesh.data=1", "--config.mesh.dcn_data=2"],
                     str(tmp_path / "multi"), str(tmp_path))
  a, b = _losses(str(tmp_path / "single")), _losses(str(tmp_path / "multi"))
  assert sorted(a) == list(range(1, STEPS + 1)) and a.keys() == b.keys()
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step
  diff = _max_diff(runs.load_vim(str(tmp_path / "single")).params,
                   runs.load_vim(str(tmp_path / "multi")).params)
  print(f"\nstage 2 (data 2 over DCN x fsdp 2 x tensor 2), 2 processes vs 1: max parameter "
        f"difference {diff:.3g}")
  assert diff < 1e-5
