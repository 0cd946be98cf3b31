"""Test set-up: 8 virtual CPU devices (for sharding tests), private temp/cache folders removed
at the end, a clean launcher environment, and a closing line with the test and skip counts.

Must run before jax is imported anywhere, which pytest guarantees for conftest.py.
"""

import atexit
import os
import shutil
import sys
import tempfile

# Everything the suite writes (pytest's tmp_path folders, tfds, subprocesses' temp files, the
# compilation cache) lives under _TMP, which goes at exit: a run used to leave ~0.5 GB behind.
# pytest-xdist's workers (`-n auto`, the README's command) start with the environment this
# file gives the controller: they share its folder and compilation cache, and only the
# controller removes the folder.
_TMP = os.environ.get("VIM_JAX_TESTS_TMP")
if _TMP is None:
  _TMP = tempfile.mkdtemp(prefix="vim_jax_tests_")
  os.environ["VIM_JAX_TESTS_TMP"] = _TMP
  atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
# A suite started inside a SLURM or Open MPI job must not hand its launcher's variables to the
# runs it starts: `--distributed=auto` would try to join that job.
for _name in list(os.environ):
  if _name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")):
    del os.environ[_name]
# XLA flags of the suite and of every process it starts (tests/run_files.cli_env keeps all but
# the device count, so that they share compilation-cache entries, whose keys hash the flags):
# - XLA's CPU compiler without LLVM's optimisation passes and without its new fusion emitters:
#   a cold compile of the tiny stage-1 train step (the suite's largest cost) takes ~8 CPU
#   seconds instead of ~32; the steps run ~15% slower on the tiny models and give the same
#   losses. Programs compiled for TPU by libtpu (the compile-report tests) read only the first.
# - 8 virtual CPU devices for the sharding tests.
XLA_TEST_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_force_host_platform_device_count=8",
)
_flags = os.environ.get("XLA_FLAGS", "").split()
_flags += [f for f in XLA_TEST_FLAGS if not any(g.startswith(f.split("=")[0]) for g in _flags)]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TFDS_DATA_DIR"] = os.path.join(_TMP, "tfds")
os.environ["TMPDIR"] = _TMP
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
# One persistent XLA compilation cache for the pytest process and every run it starts: the
# suite compiles the same tiny train steps dozens of times (each run builds new jitted
# closures, and subprocesses start cold), and jax 0.10 caches CPU executables too.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_TMP, "jax_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# A size limit turns on jax's file lock around cache reads and writes: the workers and the
# processes they start write the same entries at the same time. (No eviction at this size.)
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(64 * 2**30)
tempfile.tempdir = _TMP

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

# Files that hold the suite's longest tests, longest first (`-n auto --durations=60`,
# 2026-12-02). With pytest-xdist they are handed out first, so that no worker starts a long file
# while the other has nothing left to do; without it the order changes nothing.
LONGEST_FILES = (
    "test_evaluate.py",
    "test_tokenizer_trainer.py",
    "test_multihost.py",
    "test_evaluation_at_scale.py",
    "test_gcs.py",
    "test_compile_report.py",
    "test_readme.py",
    "test_preemption.py",
    "test_accelerator_benchmark.py",
    "test_prng.py",
    "test_lpips.py",
    "test_vim_trainer.py",
    "test_microbatch.py",
    "test_quickstart.py",
    "test_layers.py",
    "test_prepare_data.py",
    "test_notebook.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  """With `-n N`, a file's tests run on one worker (`--dist loadfile`), in LONGEST_FILES order:
  module fixtures (the multi-host runs) are built once, and a session fixture (the tiny
  tokenizer run) once per worker that needs it."""
  if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

  items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture
def tiny_config():
  """The tiny stage-1 config (shapes data, 32 px), fresh for each test."""
  from configs import vitvq_base

  return vitvq_base.get_config("tiny")


@pytest.fixture(scope="session")
def inception_files(tmp_path_factory):
  """Random-weight FID Inception files: {'pth': in pytorch-fid's published layout, 'flax': the
  same converted by `python -m vim_jax.tools.convert_inception`}."""
  from inception_reference import write_random_pth

  from vim_jax.tools import convert_inception

  folder = tmp_path_factory.mktemp("inception")
  pth, out = str(folder / "pt_inception_random.pth"), str(folder / "inception.msgpack")
  write_random_pth(pth)
  convert_inception.main([f"--pth={pth}", f"--output={out}"])
  return {"pth": pth, "flax": out}


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
  """Random-weight LPIPS files: {'vgg', 'head': the state_dicts, 'vgg_path', 'head_path': them
  in the published files' layout, 'flax': them converted by `python -m
  vim_jax.tools.convert_lpips`} (tests/lpips_reference.py)."""
  from lpips_reference import make_published_files

  from vim_jax.tools import convert_lpips

  folder = str(tmp_path_factory.mktemp("lpips"))
  vgg, head, vgg_path, head_path = make_published_files(folder)
  out = os.path.join(folder, "lpips.msgpack")
  convert_lpips.main([f"--vgg16={vgg_path}", f"--lpips_head={head_path}", f"--output={out}"])
  return {"vgg": vgg, "head": head, "flax": out, "vgg_path": vgg_path, "head_path": head_path}


# Small trained runs shared by the stage-2 and evaluation tests (trained once per session).
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """A tiny stage-1 run (4 steps, no GAN)."""
  import jax

  from configs import vitvq_base
  from vim_jax.trainers import tokenizer as tokenizer_trainer

  config = vitvq_base.get_config("tiny")
  config.loss.adversarial = 0.0
  config.update(total_steps=4, eval_every=4, checkpoint_every=4, num_eval_images=16)
  workdir = str(tmp_path_factory.mktemp("tok"))
  # The session's runs train on one device: 8 virtual devices on 2 cores only cost time here
  # (the mesh tests compare 8 devices against 1).
  tokenizer_trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def tiny_vim_config(tokenizer_dir, steps=2):
  from configs import vim_base

  config = vim_base.get_config("tiny")
  config.update(
      tokenizer_workdir=tokenizer_dir,
      total_steps=steps,
      log_every=1,
      eval_every=1000,
      checkpoint_every=1000,
      num_grid_images=8,
  )
  return config


@pytest.fixture(scope="session")
def vim_dir(tokenizer_dir, tmp_path_factory):
  """A tiny class-conditional VIM run (3 steps) on tokenizer_dir."""
  import jax

  from vim_jax.trainers import vim as vim_trainer

  workdir = str(tmp_path_factory.mktemp("vim"))
  vim_trainer.train_and_evaluate(
      tiny_vim_config(tokenizer_dir, steps=3), workdir, devices=jax.devices()[:1]
  )
  return workdir


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
  """A tiny classifier run (5 steps) on the shapes data."""
  import jax

  from configs import classifier as classifier_config
  from vim_jax.trainers import classifier as classifier_trainer

  config = classifier_config.get_config()
  config.update(total_steps=5, num_eval_images=32)
  workdir = str(tmp_path_factory.mktemp("cls"))
  classifier_trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory):
  """A fake ImageNet in the published archive layout (tests/fake_imagenet.py), prepared as the
  README's "Training on ImageNet" says: the archives in $TFDS_DATA_DIR/downloads/manual/, then
  its prepare_data command read from README.md, run from the root of a scratch copy of the
  repository with the relative TFDS_DATA_DIR=tfds. {'root' (that copy), 'manual_dir',
  'data_dir' (absolute), 'archive' (what was written), 'stdout'}."""
  import subprocess

  import fake_imagenet as fake
  import readme_commands
  from run_files import cli_env

  root = readme_commands.scratch_repository(str(tmp_path_factory.mktemp("imagenet")))
  data_dir = os.path.join(root, "tfds")
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  archive = fake.write_fake_imagenet(manual_dir)
  command = readme_commands.find("prepare_data --name=imagenet2012 --data_dir=$TFDS_DATA_DIR")
  env = {**cli_env(), "TFDS_DATA_DIR": "tfds"}
  proc = subprocess.run(
      readme_commands.to_argv(command, {"TFDS_DATA_DIR": "tfds"}),
      cwd=root,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return {
      "root": root,
      "manual_dir": manual_dir,
      "data_dir": data_dir,
      "archive": archive,
      "stdout": proc.stdout,
  }


def pytest_terminal_summary(terminalreporter):
  """One closing line CI can quote: how many tests ran, passed, failed and were skipped, and
  why each skip happened (a skip must never hide a missing dependency)."""
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the controller counts every worker's tests
    return
  stats = terminalreporter.stats
  passed, failed, errors, skipped = (
      len(stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")
  )
  ran = passed + failed + errors
  for report in stats.get("skipped", []):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    terminalreporter.write_line(f"skipped {report.nodeid}: {reason}")
  line = (
      f"vim_jax suite: {ran} tests ran ({passed} passed, {failed} failed, {errors} errors), "
      f"{skipped} skipped"
  )
  terminalreporter.write_line(line)
  if os.environ.get("VIM_JAX_SUITE_SUMMARY"):  # .ci/run ends with this line
    with open(os.environ["VIM_JAX_SUITE_SUMMARY"], "w") as f:
      f.write(line)
