"""Multi-host: 2 processes on 127.0.0.1 (4 virtual CPU devices each, gloo collectives) run the
tiny stage-1 and stage-2 configs through `python -m vim_jax.main` and must match a
1-process, 1-device run of the same config, trained in the pytest process: the loss and the
gradient norm at every step, and every array of the final checkpoint (params, Adam's moments,
the discriminator). The reference runs on one device because 8 virtual devices on 2 cores only
cost time: a gradient summed or averaged over the wrong devices or processes differs from it as
much as from an 8-device run."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import jax

from conftest import REPO_ROOT
from run_compare import assert_leaves_close
from run_files import cli_env, event_scalars
from vim_jax import fileio, main, runs

STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_single(config_spec, overrides, workdir):
  """The 1-process reference, in this process on one device: what `python -m vim_jax.main`
  does with the same flags, without paying for a second interpreter."""
  config = main.load_config_file(os.path.join(REPO_ROOT, config_spec))
  config.update_from_flattened_dict(overrides)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  main.train(config, workdir, devices=jax.devices()[:1])


def _flags(config_spec, overrides):
  return [f"--config={config_spec}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _run_two_processes(args, workdir, log_dir):
  port = _free_port()
  logs = _start_two_processes(
      lambda i: [sys.executable, "-m", "vim_jax.main", *args, f"--workdir={workdir}",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"], log_dir)
  assert "process 1 of 2, 4 local / 8 global devices" in open(logs[1]).read()


def _start_two_processes(command, log_dir):
  """Runs command(0) and command(1) together (4 CPU devices each); their log files."""
  procs, logs = [], []
  for i in range(2):
    logs.append(os.path.join(log_dir, f"process{i}.log"))
    procs.append(subprocess.Popen(
        command(i), cwd=REPO_ROOT, env=cli_env(4), stdout=open(logs[-1], "w"),
        stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, log in zip(codes, logs):
    text = open(log).read()
    errors = [line for line in text.splitlines() if "Error" in line]  # a long array can hide it
    assert code == 0, "\n".join(errors[-5:]) + "\n...\n" + text[-3000:]
  return logs


def checkpoint_arrays(workdir) -> dict[str, np.ndarray]:
  """Every array of a run's last checkpoint, read on the host, by path."""
  import orbax.checkpoint as ocp
  step = runs.checkpoint_steps(workdir)[-1]
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  metadata = ocp.PyTreeCheckpointHandler().metadata(fileio.path(path)).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  tree = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      restore_args=restore_args))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_runs_match(single, multi):
  for tag in ("train/loss", "train/grad_norm"):
    a, b = event_scalars(single)[tag], event_scalars(multi)[tag]
    assert sorted(a) == list(range(1, STEPS + 1)) and a.keys() == b.keys(), tag
    for step in a:
      assert b[step] == pytest.approx(a[step], rel=1e-5), (tag, step)
  a, b = checkpoint_arrays(single), checkpoint_arrays(multi)
  assert any("opt_state" in k and "mu" in k for k in a)
  # Params and Adam's moments, each on its own scale; the tiny configs' peak lr is 1e-3. rel:
  # the gloo all-reduce sums in another order than one device; the discriminator's moments
  # (R1's second-order gradient at step 4) differ by up to 2e-4 of a leaf's scale. A gradient
  # summed over the 2 processes instead of averaged is 100% off.
  return assert_leaves_close(a, b, rel=5e-4, param_atol=1e-3)


STAGE1 = {"total_steps": STEPS, "log_every": 1, "eval_every": 1000, "checkpoint_every": 1000,
          "num_eval_images": 16}


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost1")
  spec = "configs/vitvq_base.py:tiny"
  _run_single(spec, STAGE1, str(root / "single"))
  _run_two_processes(_flags(spec, STAGE1), str(root / "multi"), str(root))
  return str(root / "single"), str(root / "multi")


def test_stage1_two_processes_match_one(stage1_runs):
  single, multi = stage1_runs
  worst = assert_runs_match(single, multi)
  print(f"\nstage 1, 2 processes vs 1: largest difference {worst:.3g} of a leaf's scale")


def test_stage2_two_slices_fsdp_tensor_match_one(stage1_runs, tmp_path):
  single_tok, _ = stage1_runs
  spec = "configs/vim_base.py:tiny"
  overrides = {"tokenizer_workdir": single_tok, "total_steps": STEPS, "log_every": 1,
               "eval_every": 1000, "checkpoint_every": 1000, "mesh.data": 2, "mesh.fsdp": 2,
               "mesh.tensor": 2}
  _run_single(spec, overrides, str(tmp_path / "single"))
  # The same global mesh built as 2 "slices" (one per process) joined over DCN on the data
  # axis: data = 1 (in-slice) x 2 (across).
  _run_two_processes(_flags(spec, {**overrides, "mesh.data": 1, "mesh.dcn_data": 2}),
                     str(tmp_path / "multi"), str(tmp_path))
  worst = assert_runs_match(str(tmp_path / "single"), str(tmp_path / "multi"))
  print(f"\nstage 2 (data 2 over DCN x fsdp 2 x tensor 2), 2 processes vs 1: largest "
        f"difference {worst:.3g} of a leaf's scale")


def test_eval_split_inception_statistics_on_two_processes_match_one(inception_files, tmp_path):
  """The gFID reference of a stage-2 run without fid.reference_stats: each process reads its
  share of every eval batch; the statistics must cover exactly the split's images, as in one
  process. (Before the shares were gathered, jax 0.10 refused the first batch: "ndarray passed
  to device_put is not the same on each process".)"""
  from multihost_fid_stats import reference_config
  from vim_jax import fid, reported_metrics
  port, out = _free_port(), str(tmp_path / "stats.npz")
  script = os.path.join(REPO_ROOT, "tests", "multihost_fid_stats.py")
  _start_two_processes(lambda i: [sys.executable, script, f"127.0.0.1:{port}", str(i),
                                  inception_files["flax"], out], str(tmp_path))
  two = fid.FeatureStats.load(out)
  one = reported_metrics.reference_stats(reference_config(),
                                         fid.FeatureExtractor(inception_files["flax"],
                                                              batch_size=8))
  assert one.num_images == two.num_images == 20
  scale = np.abs(one.sigma).max()
  print(f"\neval-split statistics, 2 processes vs 1: max |mu diff| "
        f"{np.abs(one.mu - two.mu).max():.3g}, max |sigma diff| "
        f"{np.abs(one.sigma - two.sigma).max():.3g} (max |sigma| {scale:.3g})")
  np.testing.assert_allclose(two.mu, one.mu, rtol=0, atol=1e-5 * np.abs(one.mu).max())
  np.testing.assert_allclose(two.sigma, one.sigma, rtol=0, atol=1e-5 * scale)
