"""The path layer: gs:// workdirs reach the object store, never a local folder named 'gs:'.

What this proves and what it cannot:
- `test_no_module_opens_paths_around_the_path_layer` reads every module of the package and
  fails on a builtin open / os / glob / numpy file call outside `vim_jax/infra/fileio.py` and a
  short, reasoned allowlist. It cannot see a path handed to a third-party library.
- The `object_store` fixture serves gs:// from a folder through etils.epath's backend hook, so
  every writer and reader we own runs against a store that is not the local path it names, from
  an empty working directory where a builtin open of 'gs://b/x' would leave './gs:/b/x'.
- Neither is a GCS server: tests/test_gcs.py runs every command against one (the
  gcp-storage-emulator package, through $STORAGE_EMULATOR_HOST: orbax's tensorstore,
  google-cloud-storage, gcsfs for our files and TensorBoard events, array_record's reads).
"""

import ast
import os
import pathlib

import numpy as np
import pytest
from conftest import REPO_ROOT
from etils import epath
from etils.epath import gpath
from PIL import Image

from vim_jax.data import sources
from vim_jax.evaluators import fid
from vim_jax.infra import fileio, runs, visualize
from vim_jax.models import inception, lpips
from vim_jax.tools import weights_io

# Calls that touch files by path, and the modules allowed to make them, with the reason.
FILE_CALLS = {
    "open",
    "os.makedirs",
    "os.mkdir",
    "os.path.exists",
    "os.path.isdir",
    "os.path.isfile",
    "os.listdir",
    "os.scandir",
    "os.walk",
    "os.replace",
    "os.rename",
    "os.remove",
    "os.path.getsize",
    "glob.glob",
    "np.save",
    "np.savez",
    "np.load",
    "shutil.rmtree",
    "shutil.copy",
    "shutil.move",
    "shutil.disk_usage",
    "Image.open",
}
ALLOWED = {
    "vim_jax/infra/fileio.py": "the path layer itself (np.load of a local file, for mmap)",
    "vim_jax/data/sources.py": "FolderSource reads a local folder of images (data.folder); "
    "datasets on GCS go through tfds",
    "vim_jax/tools/prepare_data.py": "checks the manual tars and the local disk's free space; "
    "tfds itself writes the data_dir",
}


def _dotted(node: ast.AST) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return ""


def test_no_module_opens_paths_around_the_path_layer():
  offenders = []
  for path in sorted(pathlib.Path(REPO_ROOT, "vim_jax").rglob("*.py")):
    rel = path.relative_to(REPO_ROOT).as_posix()
    if rel in ALLOWED:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Call) and _dotted(node.func) in FILE_CALLS:
        offenders.append(f"{rel}:{node.lineno}: {_dotted(node.func)}(...)")
  assert (
      not offenders
  ), "use vim_jax.infra.fileio (local and gs:// alike) instead of:\n" + "\n".join(offenders)


@pytest.fixture
def object_store(tmp_path, monkeypatch):
  """gs:// served from tmp_path/store via epath's backend hook; cwd is an empty folder."""
  store = tmp_path / "store"
  store.mkdir()

  def local(p):
    p = os.fspath(p)
    return os.path.join(store, p[len("gs://") :]) if p.startswith("gs://") else p

  def one_path(original, p, *args, **kwargs):
    return original(local(p), *args, **kwargs)

  def two_paths(original, src, dst, *args, **kwargs):
    return original(local(src), local(dst), *args, **kwargs)

  def glob(original, pattern):
    found = original(local(pattern))
    if not os.fspath(pattern).startswith("gs://"):
      return found
    return ["gs://" + os.path.relpath(f, store) for f in found]

  def walk(original, top, **kwargs):
    yield from original(local(top), **kwargs)

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to tf.io
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with epath.testing.mock_epath(
      open=one_path,
      exists=one_path,
      isdir=one_path,
      listdir=one_path,
      makedirs=one_path,
      mkdir=one_path,
      remove=one_path,
      rmtree=one_path,
      stat=one_path,
      rename=two_paths,
      replace=two_paths,
      copy=two_paths,
      glob=glob,
      walk=walk,
  ):
    yield store
  assert not (cwd / "gs:").exists(), "something wrote gs:// paths to the local disk"


def test_every_writer_and_reader_round_trips_through_the_object_store(object_store):
  run = "gs://bucket/run"
  fileio.write_json(f"{run}/config.json", {"trainer": "vitvq", "image_size": 32})
  assert runs.read_run_config(run, "vitvq").image_size == 32
  assert (object_store / "bucket" / "run" / "config.json").is_file()

  rng = np.random.default_rng(0)
  stats = fid.FeatureStats(rng.normal(size=3), np.eye(3) * 2.0, 7, "shapes_eval")
  stats.save(f"{run}/eval/stats.npz")
  loaded = fid.FeatureStats.load(f"{run}/eval/stats.npz")
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  assert (loaded.num_images, loaded.description) == (7, "shapes_eval")

  grid = rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)
  visualize.save_png(grid, f"{run}/images/grid.png", min_size=8)
  with Image.open(object_store / "bucket" / "run" / "images" / "grid.png") as image:
    np.testing.assert_array_equal(np.asarray(image), grid)

  params = {"params": {"w": rng.normal(size=(2, 3)).astype(np.float32)}}
  weights_io.save_params(params, "gs://bucket/weights/w.msgpack")
  for loader in (inception.load_params, lpips.load_params):
    np.testing.assert_array_equal(
        loader("gs://bucket/weights/w.msgpack")["params"]["w"], params["params"]["w"]
    )
  with pytest.raises(FileNotFoundError):
    inception.load_params("gs://bucket/weights/missing.msgpack")

  # Pretokenized shards on the store, read back by the stage-2 token source.
  tokens = rng.integers(0, 512, (5, 16), dtype=np.int32)
  fileio.save_npy("gs://bucket/tokens/train-00000.labels.npy", np.arange(5, dtype=np.int32))
  fileio.save_npy("gs://bucket/tokens/train-00000.tokens.npy", tokens)
  fileio.write_json("gs://bucket/tokens/meta.json", {"num_classes": 6})
  source = sources.TokenSource("gs://bucket/tokens", "train")
  assert len(source) == 5 and source.num_classes == 6
  np.testing.assert_array_equal(source[3]["tokens"], tokens[3])
  assert source[3]["label"] == 3
  # No temporary files are left next to what was written.
  leftovers = [p for p in object_store.rglob("*.tmp")]
  assert not leftovers


def test_local_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
  target = tmp_path / "results.json"
  fileio.write_json(str(target), {"a": 1})
  fileio.write_json(str(target), {"a": 2})
  assert fileio.read_json(str(target)) == {"a": 2}
  assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_local_paths_come_out_absolute_and_urls_unchanged(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert str(fileio.path("workdirs/run")) == str(tmp_path / "workdirs/run")
  assert fileio.join("workdirs", "run", 3) == str(tmp_path / "workdirs/run/3")
  assert fileio.absolute("~/w") == str(tmp_path / "home/w")
  assert (
      fileio.absolute("gs://bucket/run") == "gs://bucket/run" == str(fileio.path("gs://bucket/run"))
  )
  assert fileio.absolute("") == ""  # a config's "not set" stays unset
  from configs import quickstart

  config = quickstart.get_config()
  config.stage2.tokenizer_workdir = "workdirs/q/tokenizer"
  config.stage2.fid.reference_stats = "gs://b/ref.npz"
  config.stage1.data.folder = "my_images"
  config.stage1.data.folder_eval_list = "ffhqvalidation.txt"
  resolved = fileio.with_absolute_paths(config)
  assert resolved.stage2.tokenizer_workdir == str(tmp_path / "workdirs/q/tokenizer")
  assert resolved.stage2.fid.reference_stats == "gs://b/ref.npz"
  assert resolved.stage1.data.folder == str(tmp_path / "my_images")
  assert resolved.stage1.data.folder_eval_list == str(tmp_path / "ffhqvalidation.txt")
  assert resolved.stage1.perceptual_weights == str(tmp_path / "weights/lpips_vgg16_v0.1.msgpack")
  assert resolved.stage1.data.data_dir == "" and resolved.stage1.data.folder_eval_fraction == 0.02
  assert config.stage2.tokenizer_workdir == "workdirs/q/tokenizer"  # a copy; the input stays


def test_the_gcs_client_orbax_imports_for_buckets_is_installed():
  """orbax lists the steps of a gs:// checkpoint folder through google.cloud.storage (asking
  whether the bucket has a hierarchical namespace) but does not declare it: without it, every
  save and restore in a bucket fails with an ImportError (found against a GCS emulator, issue
  28). setup.py declares it; this fails when orbax stops needing it, or the install lacks it."""
  import inspect

  from orbax.checkpoint._src.path import gcs_utils

  assert "from google.cloud import storage" in inspect.getsource(gcs_utils.get_bucket)
  from google.cloud import storage

  assert callable(storage.Client)
