"""Prepares a tfds dataset once, in the ArrayRecord format our trainers read with random access.

  python -m vim_jax.tools.prepare_data --name=imagenet2012 --data_dir=DIR [--manual_dir=DIR]

It calls tfds' Python API (`builder.download_and_prepare(file_format='array_record')`), which
needs no Apache Beam, unlike the `tfds build` command line. Before any work it:
- says whether the dataset is already prepared (then there is nothing to do);
- removes what an interrupted earlier run left (tfds writes into `incomplete.*` folders and
  renames them at the end, so a rerun starts that dataset's generation again and finishes it);
- checks the manual files a dataset needs (for imagenet2012: the two ILSVRC2012 tars, read
  through to their last member, so a truncated download fails now rather than hours in), and
  names each missing one, where it is expected and where to get it;
- checks the free disk space against what the preparation will write.
tfds shows progress bars while it generates; at the end every split is opened and read back.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter

from absl import app, flags, logging  # noqa: E402

from vim_jax.data import sources  # noqa: E402
from vim_jax.infra import log_filters  # noqa: E402

_NAME = flags.DEFINE_string(
    "name", None, "tfds dataset name, e.g. imagenet2012 or imagenet2012_subset/10pct."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "tfds data_dir to prepare into (the one the configs' data.data_dir or "
    "$TFDS_DATA_DIR name); default $TFDS_DATA_DIR, else ~/tensorflow_datasets.",
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir",
    None,
    "Folder holding manually downloaded files; default DATA_DIR/downloads/manual.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Delete an existing prepared copy of this dataset version and prepare it "
    "again (e.g. one prepared as tfrecord, which tfds.data_source cannot read).",
)
_IGNORE_DISK_SPACE = flags.DEFINE_bool(
    "ignore_disk_space", False, "Prepare even if the free space looks too small."
)

GB = 1e9
# Generated ArrayRecord size / size of the manual archives. The builder stores the archives'
# JPEG bytes as they are (re-encoding only 23 CMYK/PNG files) with a little per record: tfds'
# catalog gives 155.84 GiB (167.3 GB) of records for ImageNet's 154.6 GB of tars, a ratio of
# 1.08. (Tiny archives of small images have relatively more overhead, but need no space.)
GENERATED_PER_ARCHIVE_BYTE = 1.1


class ManualFileError(Exception):
  """A manual file that is missing, truncated or not what the builder expects."""


@dataclasses.dataclass(frozen=True)
class ManualFile:
  """A file the user must download by hand for a tfds builder."""

  name: str
  official_bytes: int
  required: bool
  where_to_get: str
  # Reads the file and returns a one-line summary; raises ManualFileError when it is unusable.
  check: Callable[[str], str]


def _tar_members(path: str) -> list[str]:
  """Every member name of a tar, read through to the end (headers only, data skipped)."""
  try:
    with tarfile.open(path, "r:") as tar:
      return [member.name for member in tar]
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ManualFileError(
        f"{path} is not a complete tar archive ({type(e).__name__}: {e}); its size is "
        f"{os.path.getsize(path) / GB:.2f} GB. Download it again."
    ) from e


def _imagenet_synsets() -> set[str]:
  import tensorflow_datasets as tfds  # lazy: loads TensorFlow (seconds); --help needs neither

  path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
  return set(path.read_text().split())


def _check_imagenet_train(path: str) -> str:
  members = _tar_members(path)
  synsets = _imagenet_synsets()
  bad = [m for m in members if not (m.endswith(".tar") and m[:-4] in synsets)]
  if bad or not members:
    raise ManualFileError(
        f"{path} should hold one <synset>.tar per ImageNet class (n01440764.tar, ...); found "
        f"{len(members)} members, {len(bad)} of them not a known synset's tar "
        f"(e.g. {bad[:3]}). Is this ILSVRC2012_img_train.tar?"
    )
  note = "" if len(members) == 1000 else " (the full archive has 1000: a partial copy?)"
  return f"{len(members)} synset archives{note}"


def _check_imagenet_val(path: str) -> str:
  members = _tar_members(path)
  numbers = []
  for name in members:
    match = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.JPEG", name)
    if not match:
      raise ManualFileError(
          f"{path} holds {name!r}; expected only ILSVRC2012_val_NNNNNNNN.JPEG "
          "images. Is this ILSVRC2012_img_val.tar?"
      )
    numbers.append(int(match.group(1)))
  # tfds pairs the sorted file names with its list of 50,000 labels, so a gap would shift every
  # later label: refuse anything but ILSVRC2012_val_00000001 .. N.
  if sorted(numbers) != list(range(1, len(numbers) + 1)) or len(numbers) > 50_000:
    raise ManualFileError(
        f"{path} holds {len(numbers)} validation images whose numbers are not 1..{len(numbers)}; "
        "tfds assigns labels by position in the sorted names, so they would be wrong. Download "
        "ILSVRC2012_img_val.tar again."
    )
  note = "" if len(numbers) == 50_000 else " (the full archive has 50000: a partial copy?)"
  return f"{len(numbers)} images{note}"


def _check_tar(path: str) -> str:
  return f"{len(_tar_members(path))} files"


_IMAGENET_SITE = "https://image-net.org/download-images (log in, then ILSVRC2012: '{}')"
IMAGENET_FILES = (
    ManualFile(
        "ILSVRC2012_img_train.tar",
        147_897_477_120,
        True,
        _IMAGENET_SITE.format("Training images (Task 1 & 2)"),
        _check_imagenet_train,
    ),
    ManualFile(
        "ILSVRC2012_img_val.tar",
        6_744_924_160,
        True,
        _IMAGENET_SITE.format("Validation images (all tasks)"),
        _check_imagenet_val,
    ),
    ManualFile(
        "ILSVRC2012_img_test.tar",
        13_718_384_640,
        False,
        _IMAGENET_SITE.format("Test images (all tasks)") + "; optional, unlabelled",
        _check_tar,
    ),
)
# Builders that read the ILSVRC2012 tars (the part of the name before '/').
MANUAL_FILES = {"imagenet2012": IMAGENET_FILES, "imagenet2012_subset": IMAGENET_FILES}


def check_manual_files(name: str, manual_dir: str, instructions: str | None) -> list[str]:
  """Checks the manual files `name` needs; returns the paths of those present.

  Raises ManualFileError naming every missing or broken file, where it is expected and where to
  get it. Builders we have no file list for only need a non-empty manual_dir.
  """
  files = MANUAL_FILES.get(name.split("/")[0])
  if files is None:
    if instructions and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
      raise ManualFileError(
          f"{name} needs files downloaded by hand into {manual_dir}, which "
          f"is missing or empty. tfds says:\n{instructions.strip()}"
      )
    return []
  problems, present = [], []
  for file in files:
    path = os.path.join(manual_dir, file.name)
    if not os.path.exists(path):
      if file.required:
        problems.append(
            f"  missing {file.name} ({file.official_bytes / GB:.1f} GB): expected at "
            f"{path}\n    get it from {file.where_to_get}"
        )
      else:
        print(f"  {file.name}: not there (optional; its split is skipped)")
      continue
    print(f"  {file.name}: checking {os.path.getsize(path) / GB:.2f} GB ...", flush=True)
    try:
      summary = file.check(path)
    except ManualFileError as e:
      problems.append(f"  {e}")
      continue
    print(f"  {file.name}: {summary}")
    present.append(path)
  if problems:
    raise ManualFileError(
        f"{name} cannot be prepared from manual_dir={manual_dir}:\n"
        + "\n".join(problems)
        + "\nPut the files there (or pass --manual_dir) and rerun this command."
    )
  return present


def remove_unfinished(data_path) -> None:
  """Deletes the incomplete.* folders an interrupted earlier preparation left next to
  data_path (DATA_DIR/name[/config]/version)."""
  for leftover in data_path.parent.glob(f"incomplete.*_{data_path.name}"):
    print(f"removing what an interrupted earlier run left: {leftover}")
    leftover.rmtree()


def _split_counts(builder) -> str:
  return ", ".join(f"{name} {info.num_examples:,}" for name, info in builder.info.splits.items())


def prepare(
    name: str,
    data_dir: str,
    manual_dir: str,
    overwrite: bool = False,
    ignore_disk_space: bool = False,
) -> None:
  """Prepares `name` in data_dir as ArrayRecord; see the module docstring."""
  import tensorflow_datasets as tfds  # lazy: loads TensorFlow (seconds); --help needs neither

  tfds.display_progress_bar(True)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends carry tfds' own explanation
    raise SystemExit(f"tfds has no dataset {name!r}: {type(e).__name__}: {e}") from e
  where = f"{name} {builder.version} in {builder.data_path}"

  if builder.is_prepared():
    if not overwrite and sources.has_array_record(builder):
      print(f"{where} is ready (array_record; {_split_counts(builder)}). Nothing to do.")
      return
    if not overwrite:
      raise SystemExit(
          f"{where} is prepared as {builder.info.file_format}, which tfds.data_source cannot "
          "read. Rerun with --overwrite to delete it and prepare it as array_record."
      )
  remove_unfinished(builder.data_path)

  print(f"checking the manual files of {name} in {manual_dir}")
  try:
    archives = check_manual_files(name, manual_dir, builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
  except ManualFileError as e:
    raise SystemExit(f"error: {e}") from e

  if archives and "://" not in data_dir:
    needed = GENERATED_PER_ARCHIVE_BYTE * sum(os.path.getsize(p) for p in archives)
    os.makedirs(data_dir, exist_ok=True)
    free = shutil.disk_usage(data_dir).free
    print(
        f"disk: about {needed / GB:.1f} GB will be written; {free / GB:.1f} GB free in "
        f"{data_dir}"
    )
    if free < needed and not ignore_disk_space:
      raise SystemExit(
          f"error: not enough free space in {data_dir}: about {needed / GB:.1f} GB "
          f"needed, {free / GB:.1f} GB free. Free some, choose another --data_dir, "
          "or pass --ignore_disk_space."
      )

  print(f"preparing {where} as array_record (tfds shows progress per split) ...", flush=True)
  start = time.time()
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir,
          try_download_gcs=False,
          download_mode=(
              tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
              if overwrite
              else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
          ),
      ),
  )
  seconds = time.time() - start
  # Read every split back through the same path the trainers use.
  builder = tfds.builder(name, data_dir=data_dir)
  for split in builder.info.splits:
    source = sources.TfdsSource(name, split, data_dir)
    first = source[0]["image"]
    print(f"  {split}: {len(source):,} examples, first image {first.shape}")
  print(
      f"{where} is ready ({seconds:.0f} s). Train on it with e.g.\n"
      f"  python -m vim_jax.main --config=configs/vitvq_base.py --workdir=WORKDIR "
      f"--config.data.name={name} --config.data.data_dir={data_dir}"
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _NAME.value:
    raise app.UsageError("--name is required, e.g. --name=imagenet2012.")
  log_filters.install()
  # tfds warns through absl about what this command already reports (a missing optional split,
  # an unprepared folder); errors still show.
  py_logging.getLogger("absl").setLevel(py_logging.ERROR)
  logging.set_verbosity(logging.ERROR)
  data_dir = sources.tfds_data_dir(_DATA_DIR.value)
  manual_dir = _MANUAL_DIR.value or os.path.join(data_dir, "downloads", "manual")
  prepare(_NAME.value, data_dir, manual_dir, _OVERWRITE.value, _IGNORE_DISK_SPACE.value)


if __name__ == "__main__":
  sys.exit(app.run(main))
