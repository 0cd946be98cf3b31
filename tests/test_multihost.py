"""Multi-host, rehearsed on one machine as on a pod slice: 4 processes on 127.0.0.1 (gloo
collectives) whose mesh puts the tensor axis across processes, so that pairs of processes hold
the same batch rows (VIM-Large's tensor=4 on a v4-128), run the tiny stage-1 and stage-2
configs through `python -m vim_jax.main` and must match a 1-process, 1-device run of the same
config: the loss and the gradient norm at every step, and every array of the final checkpoint
(params, Adam's moments, the discriminator). The reference runs on one device because 8 virtual
devices on 2 cores only cost time: a gradient summed or averaged over the wrong devices or
processes differs from it as much as from an 8-device run."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from run_compare import assert_leaves_close
from run_files import cli_env, event_scalars, free_port, start_processes

from vim_jax import main
from vim_jax.infra import fileio, runs

STEPS = 8


ONE_DEVICE = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}


def _run_single(config_spec, overrides, workdir):
  """The 1-process reference, in this process on one of its 8 devices: what
  `python -m vim_jax.main` does with the same flags, without paying for a second interpreter."""
  config = main.load_config_file(os.path.join(REPO_ROOT, config_spec))
  config.update_from_flattened_dict(overrides)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  main.train(config, workdir, devices=jax.devices()[:1])


def _run_single_process(config_spec, overrides, workdir):
  """The 1-process reference as `python -m vim_jax.main` in a process of one CPU device, as
  each multi-host process is. Stage 1 needs it: the same 1-device program run in a process of
  8 virtual devices (the pytest process) rounds its first R1 step differently (XLA's CPU
  runtime splits work by the process's devices), and Adam's first update, g / (|g| + eps),
  turns the sign of every gradient element that is zero up to rounding into a full step of
  the learning rate; the GAN then carries the difference to ~1e-3 of the loss by step 8. In a
  1-device process the reference matches the 4-process run to ~2e-7 at every step."""
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.main", *_flags(config_spec, {**overrides, **ONE_DEVICE})]
      + [f"--workdir={workdir}"],
      cwd=REPO_ROOT,
      env=cli_env(1),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def _flags(config_spec, overrides):
  return [f"--config={config_spec}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _run_processes(count, args, workdir, log_dir, devices_per_process=1, env=None):
  """`python -m vim_jax.main ARGS` as `count` processes of `devices_per_process` CPU devices
  on 127.0.0.1; env(i): extra environment of process i. Returns their log files."""
  port = free_port()
  logs = start_processes(
      count,
      lambda i: [
          sys.executable,
          "-m",
          "vim_jax.main",
          *args,
          f"--workdir={workdir}",
          f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={count}",
          f"--process_id={i}",
      ],
      log_dir,
      devices_per_process,
      env,
  )
  last = open(logs[-1]).read()
  total = count * devices_per_process
  assert (
      f"process {count - 1} of {count}, {devices_per_process} local / {total} global devices"
  ) in last
  return logs


def fed_rows(log: str) -> str:
  """The rows of each training batch a process's log says it loads."""
  return re.search(
      r"input: this process loads rows (\S+) of each training batch", open(log).read()
  ).group(1)


def checkpoint_arrays(workdir) -> dict[str, np.ndarray]:
  """Every array of a run's last checkpoint, read on the host, by path."""
  import orbax.checkpoint as ocp

  step = runs.checkpoint_steps(workdir)[-1]
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  metadata = ocp.PyTreeCheckpointHandler().metadata(fileio.path(path)).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  tree = ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
  )
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_runs_match(single, multi, rel: float = 1e-5, leaf_rel: float = 5e-4) -> str:
  """Every step's loss and grad_norm (within rel), and every array of the final checkpoints
  (within leaf_rel of each leaf's scale); returns the worst differences, in words."""
  worst = {}
  for tag in ("train/loss", "train/grad_norm"):
    a, b = event_scalars(single)[tag], event_scalars(multi)[tag]
    assert sorted(a) == list(range(1, STEPS + 1)) and a.keys() == b.keys(), tag
    for step in a:
      assert b[step] == pytest.approx(a[step], rel=rel), (tag, step)
    worst[tag] = max(abs(b[s] - a[s]) / abs(a[s]) for s in a)
  a, b = checkpoint_arrays(single), checkpoint_arrays(multi)
  assert any("opt_state" in k and "mu" in k for k in a)
  # Params and Adam's moments, each on its own scale; the tiny configs' peak lr is 1e-3. rel:
  # the gloo all-reduce sums in another order than one device; the discriminator's moments
  # (R1's second-order gradient at step 4) differ by up to 2e-4 of a leaf's scale. A gradient
  # summed over the 2 processes instead of averaged is 100% off.
  share = assert_leaves_close(a, b, rel=leaf_rel, param_atol=1e-3)
  return (
      f"loss within {worst['train/loss']:.2g}, grad_norm within "
      f"{worst['train/grad_norm']:.2g} (relative, worst step); the final state's worst "
      f"leaf uses {share:.0%} of its tolerance"
  )


STAGE1 = {
    "total_steps": STEPS,
    "log_every": 1,
    "eval_every": 1000,
    "checkpoint_every": 1000,
    "num_eval_images": 16,
}


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory):
  """The 1-device reference, and 4 processes of 1 device with mesh fsdp=2 x tensor=2: each
  tensor group spans 2 processes, which hold (and load) the same half of every batch. The
  4-process run is first killed: process 2 gets SIGKILL after step 4's checkpoint; the others
  must stop on their own, saying why, and the same command then resumes and finishes."""
  root = tmp_path_factory.mktemp("multihost1")
  spec = "configs/vitvq_base.py:tiny"
  _run_single_process(spec, STAGE1, str(root / "single"))
  flags = _flags(
      spec, {**STAGE1, "checkpoint_every": 4, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
  ) + ["--heartbeat_timeout=10"]
  killed = _interrupt(
      flags, str(root / "multi"), str(root / "killed"), {2: signal.SIGKILL}, after="step 5/"
  )
  logs = _run_processes(4, flags, str(root / "multi"), str(root))
  return str(root / "single"), str(root / "multi"), logs, killed


def _interrupt(flags, workdir, log_dir, signals: dict, after: str, env=None):
  """Starts `python -m vim_jax.main FLAGS` as 4 processes; once process 0 has logged `after`,
  sends signals[i] to process i; returns {'codes', 'seconds' (signal to the last exit),
  'logs' (texts)}. env(i): extra environment of process i."""
  os.makedirs(log_dir)
  port = free_port()
  logs = [os.path.join(log_dir, f"process{i}.log") for i in range(4)]
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              "vim_jax.main",
              *flags,
              f"--workdir={workdir}",
              f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=4",
              f"--process_id={i}",
          ],
          cwd=REPO_ROOT,
          env={**cli_env(1), **(env(i) if env else {})},
          stdout=open(logs[i], "w"),
          stderr=subprocess.STDOUT,
      )
      for i in range(4)
  ]
  try:
    start = time.time()
    while after not in open(logs[0]).read():
      assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
      assert time.time() - start < 600, "the run never reached " + after
      time.sleep(0.05)
    for i, signum in signals.items():
      procs[i].send_signal(signum)
    sent_at = time.time()
    codes = [p.wait(timeout=120) for p in procs]
    seconds = time.time() - sent_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return {"codes": codes, "seconds": seconds, "logs": [open(log).read() for log in logs]}


def test_stage1_four_processes_with_tensor_across_processes_match_one(stage1_runs):
  single, multi, logs, _ = stage1_runs
  assert [fed_rows(log) for log in logs] == ["[0..7]", "[0..7]", "[8..15]", "[8..15]"]
  # As tight as stage 2, against a reference in a 1-device process (_run_single_process). A
  # gradient summed instead of averaged over the processes is 100% off.
  worst = assert_runs_match(single, multi)
  print(
      f"\nstage 1, 4 processes (fsdp 2 x tensor 2, tensor across processes, killed once and "
      f"resumed) vs 1: {worst}"
  )


def test_a_dead_process_stops_the_others_which_say_so_and_a_rerun_resumes(stage1_runs):
  _, multi, logs, killed = stage1_runs
  codes, texts = killed["codes"], killed["logs"]
  assert codes[2] == -signal.SIGKILL
  assert all(code != 0 for code in codes), codes  # nobody pretends the run finished
  # Bounded: the survivors' collectives fail at once, JAX's heartbeat (10 s here) ends them.
  assert killed["seconds"] < 60, killed["seconds"]
  survivors = [texts[i] for i in (0, 1, 3)]
  assert any("Task 2 heartbeat timeout" in t for t in survivors)  # JAX names the dead process
  said = [t for t in survivors if "stopped: " in t and "Start every process again" in t]
  assert said, "no survivor explained what to do"
  assert "the run resumes from step 4, exactly" in said[0]
  rerun = open(logs[0]).read()
  assert "checkpoint: restoring step 4" in rerun and "resumed at step 4" in rerun
  print(
      f"\nSIGKILL of process 2 of 4: the others exited {killed['seconds']:.1f} s later "
      f"(codes {codes})"
  )


def test_vim_step_two_nodes_of_two_processes_stopped_by_sigterm_and_rerun_match_one(
    stage1_runs, tmp_path
):
  """A GPU cluster's layout: 2 nodes (SLURM_NODEID) of 2 processes, one device each (one
  process per GPU); data parallel over the nodes (dcn_data=2 counts nodes, not processes),
  tensor=2 over each node's 2 devices, so every tensor group spans the node's 2 processes.
  Every process gets SIGTERM mid-run (a preempted slice): all save the same step and exit 0;
  the same command resumes, and every step's loss and the final state match the 1-process,
  uninterrupted run."""
  single_tok, _, _, _ = stage1_runs
  spec = "configs/vim_base.py:tiny"
  overrides = {
      "tokenizer_workdir": single_tok,
      "total_steps": STEPS,
      "log_every": 1,
      "eval_every": 1000,
      "checkpoint_every": 1000,
  }
  _run_single(spec, overrides, str(tmp_path / "single"))
  mesh = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 2, "mesh.dcn_data": 2}
  flags, workdir = _flags(spec, {**overrides, **mesh}), str(tmp_path / "multi")
  nodes = lambda i: {"SLURM_NODEID": str(i // 2)}  # noqa: E731
  stopped = _interrupt(
      flags,
      workdir,
      str(tmp_path / "stopped"),
      dict.fromkeys(range(4), signal.SIGTERM),
      after="step 1/",
      env=nodes,
  )
  assert stopped["codes"] == [0, 0, 0, 0], [t[-2000:] for t in stopped["logs"]]
  saved = {int(re.search(r"stop requested: saved step (\d+)", t).group(1)) for t in stopped["logs"]}
  assert len(saved) == 1 and 1 < min(saved) < STEPS, saved  # one step, for all 4
  (step,) = saved
  logs = _run_processes(4, flags, workdir, str(tmp_path), env=nodes)
  assert f"resumed at step {step}" in open(logs[0]).read()
  assert [fed_rows(log) for log in logs] == ["[0..7]", "[0..7]", "[8..15]", "[8..15]"]
  worst = assert_runs_match(str(tmp_path / "single"), workdir)
  print(
      f"\nstage 2 (2 nodes over DCN x tensor 2 across each node's 2 processes), 4 processes "
      f"stopped by SIGTERM at step {step} ({stopped['seconds']:.1f} s to exit) and rerun, "
      f"vs 1 uninterrupted: {worst}"
  )


def test_eval_split_inception_statistics_on_two_processes_match_one(inception_files, tmp_path):
  """The gFID reference of a stage-2 run without fid.reference_stats: each process reads its
  share of every eval batch; the statistics must cover exactly the split's images, as in one
  process. (Before the shares were gathered, jax 0.10 refused the first batch: "ndarray passed
  to device_put is not the same on each process".)"""
  from multihost_fid_stats import reference_config

  from vim_jax.evaluators import fid, paper_metrics

  port, out = free_port(), str(tmp_path / "stats.npz")
  script = os.path.join(REPO_ROOT, "tests", "multihost_fid_stats.py")
  start_processes(
      2,
      lambda i: [sys.executable, script, f"127.0.0.1:{port}", str(i), inception_files["flax"], out],
      str(tmp_path),
  )
  two = fid.FeatureStats.load(out)
  one = paper_metrics.reference_stats(
      reference_config(), fid.FeatureExtractor(inception_files["flax"], batch_size=8)
  )
  assert one.num_images == two.num_images == 20
  scale = np.abs(one.sigma).max()
  print(
      f"\neval-split statistics, 2 processes vs 1: max |mu diff| "
      f"{np.abs(one.mu - two.mu).max():.3g}, max |sigma diff| "
      f"{np.abs(one.sigma - two.sigma).max():.3g} (max |sigma| {scale:.3g})"
  )
  np.testing.assert_allclose(two.mu, one.mu, rtol=0, atol=1e-5 * np.abs(one.mu).max())
  np.testing.assert_allclose(two.sigma, one.sigma, rtol=0, atol=1e-5 * scale)
