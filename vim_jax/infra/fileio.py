"""Every file the project reads or writes goes through here: local paths and gs:// alike.

Builtin `open` and `os.makedirs` treat 'gs://b/run' as a local folder named 'gs:' and write
there without complaint; etils.epath (which orbax already uses for checkpoints) sends gs://
paths to GCS and local paths to the disk. `tests/test_fileio.py` fails when a module of the
package opens a path any other way.

Local paths come out absolute (`~` expanded): a run started with `--workdir=workdirs/x` hands
its paths to orbax, which refuses relative ones, and records them in config.json, which later
commands may read from another folder. gs:// paths stay as they are.

Writes of whole files are atomic: local files are written to `<path>.tmp` and renamed, so a
kill never leaves half a file; a GCS object only appears once its upload completes.
"""

from __future__ import annotations

import copy
import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath


def is_remote(p: str | epath.Path) -> bool:
  """gs:// and other object stores (no rename, no memory mapping)."""
  return "://" in str(p)


def absolute(p: str | epath.Path) -> str:
  """`p` as an absolute path: local paths from the current folder (and `~` expanded); gs://
  and other URLs unchanged; "" stays "" (a config's "not set")."""
  p = str(p)
  if not p or is_remote(p):
    return p
  return os.path.abspath(os.path.expanduser(p))


# A config field holds a path when its name ends so (data_dir, tokens_dir, folder,
# folder_eval_list, tokenizer_workdir, perceptual_weights, fid.inception_weights,
# fid.reference_stats).
PATH_FIELD_ENDINGS = ("_dir", "_workdir", "folder", "_list", "_weights", "_stats")


def with_absolute_paths(config):
  """A copy of an ml_collections config whose local path fields (PATH_FIELD_ENDINGS, at any
  depth) are absolute, so that config.json records where the files are whatever folder a
  later command starts in."""
  config = copy.deepcopy(config)
  for name, value in path_fields(config).items():
    *parents, key = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[key] = absolute(value)
  return config


def path_fields(config) -> dict[str, str]:
  """{dotted name: value} of an ml_collections config's non-empty path fields
  (PATH_FIELD_ENDINGS, at any depth)."""
  found = {}

  def visit(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        visit(value, f"{prefix}{key}.")
      elif isinstance(value, str) and value and key.endswith(PATH_FIELD_ENDINGS):
        found[prefix + key] = value

  visit(config, "")
  return found


def check_buckets(named_paths: dict[str, str]) -> None:
  """Stops, before any work, when a gs:// path names a bucket that does not exist (or that
  these credentials cannot see): otherwise the first write fails minutes later, after the
  compile, or (through some clients) creates the bucket in a default region.

  named_paths: {what the user set, e.g. 'workdir' or 'data.data_dir': its path}.
  """
  for name, value in named_paths.items():
    if not str(value).startswith("gs://"):
      continue
    bucket = "gs://" + str(value)[len("gs://") :].split("/", 1)[0]
    try:
      found = epath.Path(bucket).exists()
    except Exception as e:  # pylint: disable=broad-except; explained with the cause
      raise FileNotFoundError(
          f"{name}={value}: cannot reach the bucket {bucket} ({type(e).__name__}: {e}). Check "
          "the credentials (`gcloud auth application-default login`, or the TPU VM's service "
          "account) and, for a local GCS emulator, $STORAGE_EMULATOR_HOST."
      ) from e
    if not found:
      raise FileNotFoundError(
          f"{name}={value}: the bucket {bucket} does not exist (or these credentials cannot "
          f"see it). Create it in the TPU's region first: gcloud storage buckets create "
          f'{bucket} --location=REGION (see launch/README.md, "Buckets").'
      )


def path(p: str | epath.Path) -> epath.Path:
  """An epath.Path for `p`, absolute when local (see the module docstring)."""
  if isinstance(p, epath.Path) and p.is_absolute():
    return p
  return epath.Path(absolute(p))


def exists(p: str | epath.Path) -> bool:
  return bool(p) and path(p).exists()


def makedirs(p: str | epath.Path) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def join(*parts: str | epath.Path) -> str:
  return str(path(parts[0]).joinpath(*[str(q) for q in parts[1:]]))


def write_bytes(p: str | epath.Path, data: bytes) -> None:
  """Writes the whole file at once, creating its folder; atomic (see the module docstring)."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_bytes(data)
    return
  # A temporary name without the target's: TensorBoard reads any file named *tfevents*.
  tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
  tmp.write_bytes(data)
  tmp.replace(target)


def read_bytes(p: str | epath.Path) -> bytes:
  return path(p).read_bytes()


def write_text(p: str | epath.Path, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def read_text(p: str | epath.Path) -> str:
  return read_bytes(p).decode("utf-8")


def write_json(p: str | epath.Path, value: Any) -> None:
  write_text(p, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(p: str | epath.Path) -> Any:
  return json.loads(read_text(p))


def save_npz(p: str | epath.Path, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(p, buffer.getvalue())


def load_npz(p: str | epath.Path) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(read_bytes(p))) as f:
    return {k: f[k] for k in f.files}


def save_npy(p: str | epath.Path, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_bytes(p, buffer.getvalue())


def load_npy(p: str | epath.Path, mmap: bool = False) -> np.ndarray:
  """A .npy array; memory-mapped when asked and the file is local (GCS reads it whole)."""
  if mmap and not is_remote(p):
    return np.load(str(p), mmap_mode="r")
  return np.load(io.BytesIO(read_bytes(p)))


def glob(folder: str | epath.Path, pattern: str) -> list[str]:
  """Sorted paths under `folder` matching `pattern` (e.g. 'train-*.tokens.npy')."""
  return sorted(str(q) for q in path(folder).glob(pattern))
