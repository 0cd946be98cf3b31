"""gs:// against a real GCS server (tests/gcs_emulator.py): every command of the pipeline reads
and writes a bucket through the one switch, $STORAGE_EMULATOR_HOST (vim_jax/infra/storage.py).

Every command here runs as a user runs it, in a subprocess whose environment names the server;
the pytest process itself never points its clients at it (the fake-backend tests in
test_fileio.py share these workers). What is checked is read back through the server's JSON API
(GcsEmulator.objects/read), independently of the clients under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import run_files
from conftest import REPO_ROOT
from gcs_emulator import GcsEmulator

BUCKET = "bucket"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  server = GcsEmulator(BUCKET, log_path=str(tmp_path_factory.mktemp("gcs") / "server.log"))
  yield server
  server.stop()


def _env(gcs, home):
  """A user's shell on one CPU device, with $HOME an empty folder (to see nothing lands there)
  and $STORAGE_EMULATOR_HOST naming the server."""
  env = {**run_files.cli_env(), **gcs.env(), "HOME": str(home)}
  env.pop("TFDS_DATA_DIR")  # every data_dir is given as gs://
  return env


def _run(args, env, cwd, timeout=600):
  """Runs `python -m ARGS...`; returns its output, failing with its end if it failed."""
  done = subprocess.run(
      [sys.executable, "-m", *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr[-4000:]}"
  return done.stdout + done.stderr


def _upload(gcs, folder, prefix, skip=()):
  """Copies a local folder's files into the bucket under prefix/ (as `gcloud storage cp -r`)."""
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if d not in skip]
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        gcs.write(f"{prefix}/{os.path.relpath(path, folder)}", f.read())


def _tree(folder):
  """Every file and folder under `folder`, relative."""
  return sorted(
      os.path.relpath(os.path.join(root, name), folder)
      for root, dirs, files in os.walk(folder)
      for name in dirs + files
  )


# TensorBoard's own loader, in the mode it runs in without TensorFlow (`pip install
# tensorboard`): its gfile goes through fsspec, so gcsfs and $STORAGE_EMULATOR_HOST reach the
# server. (TensorFlow's GCS client, which TensorBoard uses when TensorFlow is installed, has
# its endpoint built in and cannot be pointed at any server.)
_READ_SCALARS = textwrap.dedent("""
    import json, sys, types
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
    import vim_jax  # the switch: gcsfs's anonymous token for the emulator
    from tensorboard.backend.event_processing import event_accumulator
    loader = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"tensors": 0})
    loader.Reload()
    from tensorboard.util import tensor_util
    scalars = [tag for tag in loader.Tags()["tensors"]
               if loader.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"]
    print(json.dumps({tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                            for e in loader.Tensors(tag)} for tag in scalars}))
""")


def test_the_pipeline_keeps_everything_in_the_bucket(gcs, fake_imagenet, inception_files, tmp_path):
  """Stage 1 on the fake ImageNet prepared into the bucket, stage 2 on its tokenizer, evaluate
  with converted Inception weights from the bucket, sample and probe: every workdir, the data
  and the weights in gs://, and nothing written under the working folder or $HOME."""
  cwd, home = tmp_path / "cwd", tmp_path / "home"
  cwd.mkdir(), home.mkdir()
  env = _env(gcs, home)
  _upload(gcs, fake_imagenet["data_dir"], "tfds", skip=("downloads",))
  _upload(gcs, os.path.dirname(inception_files["flax"]), "weights")
  root = f"gs://{BUCKET}/chain"
  data = [
      "--config.data.source=tfds",
      "--config.data.name=imagenet2012",
      f"--config.data.data_dir=gs://{BUCKET}/tfds",
  ]
  config = lambda name: f"--config={os.path.join(REPO_ROOT, 'configs', name)}"
  _run(
      [
          "vim_jax.main",
          config("vitvq_base.py:tiny"),
          f"--workdir={root}/tokenizer",
          *data,
          "--config.total_steps=4",
          "--config.log_every=1",
          "--config.eval_every=4",
          "--config.checkpoint_every=4",
          "--config.loss.adversarial=0",
          "--config.num_eval_images=8",
      ],
      env,
      cwd,
  )
  _run(
      [
          "vim_jax.main",
          config("vim_base.py:tiny"),
          f"--workdir={root}/vim",
          f"--config.tokenizer_workdir={root}/tokenizer",
          *data,
          "--config.model.num_classes=0",
          "--config.total_steps=3",
          "--config.log_every=1",
          "--config.eval_every=3",
          "--config.checkpoint_every=3",
          "--config.num_grid_images=8",
          "--config.num_eval_images=8",
          "--config.probe.num_train_images=16",
          "--config.probe.num_eval_images=8",
          "--config.probe.batch_size=8",
          "--config.probe.steps=5",
      ],
      env,
      cwd,
  )
  weights = f"gs://{BUCKET}/weights/{os.path.basename(inception_files['flax'])}"
  _run(
      [
          "vim_jax.evaluate",
          f"--workdir={root}/tokenizer",
          f"--inception_weights={weights}",
          "--batch_size=8",
      ],
      env,
      cwd,
  )
  _run(["vim_jax.sample", f"--workdir={root}/vim", "--num_samples=8", "--batch_size=8"], env, cwd)
  _run(["vim_jax.probe", f"--workdir={root}/vim"], env, cwd)

  assert _tree(cwd) == [] and _tree(home) == []
  objects = gcs.objects("chain/")
  print("\nthe chain's objects in the bucket (checkpoint internals left out):")
  for name, size in objects.items():
    if "/checkpoints/" not in name or name.count("/") <= 4:
      print(f"  {size:>9}  gs://{BUCKET}/{name}")
  for run in ("tokenizer", "vim"):
    assert json.loads(gcs.read(f"chain/{run}/config.json"))["data"]["data_dir"] == (
        f"gs://{BUCKET}/tfds"
    )
    assert any(n.startswith(f"chain/{run}/checkpoints/") for n in objects)
  tokenizer_steps = {
      n.split("/")[3] for n in objects if n.startswith("chain/tokenizer/checkpoints/")
  }
  assert tokenizer_steps == {"4"}
  results = json.loads(gcs.read("chain/tokenizer/eval/results_00000004.json"))
  assert results["metrics"]["psnr"]["num_images"] == 8

  # TensorBoard reads the run's scalars back from the bucket: the same values the run logged.
  read = subprocess.run(
      [sys.executable, "-c", _READ_SCALARS, f"{root}/tokenizer"],
      env=env,
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert read.returncode == 0, read.stderr[-3000:]
  scalars = json.loads(read.stdout.splitlines()[-1])
  print(
      "TensorBoard's loader read from the bucket:",
      {t: v for t, v in scalars.items() if t in ("train/loss", "eval/psnr")},
  )
  assert sorted(scalars["train/loss"]) == ["1", "2", "3", "4"]
  assert scalars["eval/psnr"]["4"] == pytest.approx(results["metrics"]["psnr"]["value"], abs=1e-3)


# A stage-1 run's latest parameters, loaded from wherever its workdir is: "<step> <sha256>".
_PARAMS_DIGEST = textwrap.dedent("""
    import hashlib, sys
    import jax, numpy as np
    from vim_jax.infra import runs
    run = runs.load_tokenizer(sys.argv[1])
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(run.params):
      digest.update(np.asarray(leaf).tobytes())
    print(run.step, digest.hexdigest())
""")


def _digest(workdir, env, cwd):
  done = subprocess.run(
      [sys.executable, "-c", _PARAMS_DIGEST, workdir],
      env=env,
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.split()[-2:]


def _stage1(workdir, steps=4, checkpoint_every=2):
  return [
      "vim_jax.main",
      f"--config={os.path.join(REPO_ROOT, 'configs', 'vitvq_base.py:tiny')}",
      f"--workdir={workdir}",
      f"--config.total_steps={steps}",
      "--config.log_every=1",
      f"--config.eval_every={steps}",
      f"--config.checkpoint_every={checkpoint_every}",
      "--config.num_eval_images=8",
      "--config.eval_batch_size=8",
      "--config.loss.adversarial=0",
  ]


def test_resume_from_the_bucket_is_exact_and_a_corrupt_latest_is_moved_aside(gcs, tmp_path):
  """A 4-step run saving at 2 and 4; its step-4 checkpoint deleted (a preemption before that
  save), the rerun resumes at 2 and ends with the same parameters, bit for bit; then step 4's
  data overwritten (a damaged object): moved to checkpoints/corrupt/4, resumed at 2, equal."""
  env, cwd = _env(gcs, tmp_path), str(tmp_path)
  workdir = f"gs://{BUCKET}/resume"
  _run(_stage1(workdir), env, cwd)
  straight = _digest(workdir, env, cwd)
  assert straight[0] == "4"
  step4 = [n for n in gcs.objects("resume/checkpoints/4/")]
  assert step4 and set(gcs.objects("resume/checkpoints/2/"))
  for name in step4:
    gcs.delete(name)
  log = _run(_stage1(workdir), env, cwd)
  assert "resumed at step 2" in log
  assert _digest(workdir, env, cwd) == straight

  data = [n for n in gcs.objects("resume/checkpoints/4/") if "/d/" in n]
  assert data
  for name in data:
    gcs.write(name, b"garbage")
  log = _run(_stage1(workdir), env, cwd)
  assert "corrupt or partial" in log
  assert gcs.objects("resume/checkpoints/corrupt/4/")
  assert _digest(workdir, env, cwd) == straight


def test_two_processes_commit_their_checkpoints_to_the_bucket(gcs, tmp_path):
  """The multi-process rehearsal on the bucket: 2 processes (fsdp=2 across them) save through
  orbax's multi-process commit to gs://, each its own shards, and one process restores the
  result. (That 2 processes train as 1 does is tests/test_multihost.py's, on local disk.)"""
  env, cwd = _env(gcs, tmp_path), str(tmp_path)
  multi = f"gs://{BUCKET}/two_processes"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  processes = [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              *_stage1(multi),
              "--config.mesh.data=1",
              "--config.mesh.fsdp=2",
              f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2",
              f"--process_id={i}",
          ],
          cwd=cwd,
          env=env,
          stdout=open(logs[i], "w"),
          stderr=subprocess.STDOUT,
      )
      for i in range(2)
  ]
  for i, p in enumerate(processes):
    assert p.wait(timeout=600) == 0, f"process {i}:\n{logs[i].read_text()[-3000:]}"
  for step in ("2", "4"):
    committed = gcs.objects(f"two_processes/checkpoints/{step}/")
    assert f"two_processes/checkpoints/{step}/commit_success.txt" in committed
    assert any("ocdbt.process_1" in n for n in committed)  # process 1 wrote its own shards
  assert _digest(multi, env, cwd)[0] == "4"


def test_a_bucket_that_does_not_exist_stops_the_run_at_start(gcs, tmp_path):
  env, cwd = _env(gcs, tmp_path), str(tmp_path)
  done = subprocess.run(
      [sys.executable, "-m", *_stage1("gs://no-such-bucket/run")],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  print("\nwhat the user sees:", done.stderr.strip().splitlines()[-1])
  assert done.returncode == 2
  assert "the bucket gs://no-such-bucket does not exist" in done.stderr
  assert "gcloud storage buckets create gs://no-such-bucket" in done.stderr
  assert "step 1" not in done.stdout + done.stderr  # stopped before training, let alone saving


def test_the_server_stopping_mid_run_ends_it_with_the_bucket_named_and_a_rerun_resumes(tmp_path):
  """The bucket's server stops after step 3's checkpoint, while the run saves every step. The
  run either ends (no hang) naming the bucket, or, when the stop caught a checkpoint write,
  whose client (tensorstore) retries with backoff, waits and completes once the server is back
  (started again on the same disk after 60 s). Either way the same command then resumes from
  the last checkpoint that completed (never from a save cut short) and finishes."""
  disk = tmp_path / "disk"
  disk.mkdir()
  server = GcsEmulator(BUCKET, disk=str(disk), log_path=str(tmp_path / "server.log"))
  env, cwd = _env(server, tmp_path), str(tmp_path)
  command = [sys.executable, "-m", *_stage1(f"gs://{BUCKET}/fault", steps=12, checkpoint_every=1)]
  committed = lambda: sorted(
      int(n.split("/")[2])
      for n in server.objects("fault/checkpoints/")
      if n.endswith("/commit_success.txt") and n.count("/") == 3
  )
  try:
    with open(tmp_path / "run.log", "w") as log:
      run = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
      while 3 not in committed():
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.1)
      server.stop()
      try:
        code = run.wait(timeout=60)
      except subprocess.TimeoutExpired:
        code = None  # still retrying: bring the server back
      server = GcsEmulator(
          BUCKET, disk=str(disk), port=server.port, log_path=str(tmp_path / "server.log")
      )
      if code is None:
        code = run.wait(timeout=600)
    said = (tmp_path / "run.log").read_text()
    complete = committed()
    folders = sorted({n.split("/")[2] for n in server.objects("fault/checkpoints/")})
    print(
        f"\nserver stopped after step 3's checkpoint: the run exited {code}; checkpoint "
        f"folders in the bucket {folders}, completed {complete}"
    )
    if code == 0:  # the client's retries outlasted the outage
      assert complete[-1] == 12
    else:
      stopped = [line for line in said.splitlines() if "stopped: the bucket gs://bucket" in line]
      assert code == 1 and stopped, said[-3000:]
      print("what the user sees:", stopped[0].split("] ", 1)[-1][:160], "...")
      rerun = _run(command[2:], env, cwd)
      assert f"resumed at step {complete[-1]}" in rerun
    assert _digest(f"gs://{BUCKET}/fault", env, cwd)[0] == "12"
  finally:
    server.stop()


def test_only_connection_failures_are_reported_as_an_unreachable_bucket():
  """A run on gs:// that fails for its own reasons (a missing object, a bad value) raises as
  usual; only a server that cannot be reached ends it with 'the bucket stopped answering'."""
  from vim_jax import main

  def chained(outer, inner):
    try:
      try:
        raise inner
      except BaseException as e:
        raise outer from e
    except BaseException as e:
      return e

  workdir = "gs://bucket/runs/a"
  missing = chained(RuntimeError("restore failed"), FileNotFoundError("gs://bucket/x/1"))
  assert main.unreachable_bucket(missing, workdir) is None
  assert main.unreachable_bucket(ValueError("bad shape"), workdir) is None
  refused = chained(RuntimeError("save failed"), ConnectionRefusedError(111, "refused"))
  assert main.unreachable_bucket(refused, workdir) == "gs://bucket"
  tensorstore = ValueError("UNAVAILABLE: Error writing gs://bucket/c: Connection refused")
  assert main.unreachable_bucket(tensorstore, workdir) == "gs://bucket"
  assert main.unreachable_bucket(refused, "/local/run") is None
