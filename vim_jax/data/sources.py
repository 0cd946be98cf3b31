"""Indexable image sources: the embedded shapes dataset, tfds datasets, folders of images.

A source has len() and __getitem__(i) -> {'image': uint8 [H, W, 3], 'label': int}, and the
attribute `num_classes`. Random access is what makes every batch a pure function of
(seed, step), and so makes resume exact without checkpointing an iterator.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
from PIL import Image

from vim_jax.data import shapes
from vim_jax.infra import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class CorruptImageError(Exception):
  """An example whose image could not be decoded; the pipeline skips and counts it."""


class ShapesSource:
  """The embedded dataset (see data/shapes.py)."""

  def __init__(
      self,
      split: str,
      num_examples: int,
      resolution: int,
      seed: int,
      num_classes: int = len(shapes.CLASS_NAMES),
      style: shapes.ShapesStyle = shapes.ShapesStyle(),
  ):
    self.split, self.num_examples, self.resolution = split, num_examples, resolution
    self.seed, self.num_classes, self.style = seed, num_classes, style

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index: int):
    image, label = shapes.render_example(
        self.seed, self.split, int(index), self.resolution, self.num_classes, self.style
    )
    return {"image": image, "label": label}


def to_rgb(image: Image.Image) -> Image.Image:
  """Converts grayscale, palette and alpha images to RGB (alpha composited over white)."""
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA"):
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
  return image.convert("RGB")


def decode_image_file(path: str) -> np.ndarray:
  """uint8 [H, W, 3] from an image file; CorruptImageError if it cannot be decoded."""
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(to_rgb(image), dtype=np.uint8)
  except Exception as e:  # PIL raises many types for broken files
    raise CorruptImageError(f"{path}: {type(e).__name__}: {e}") from e


class FolderSource:
  """Images under a folder, searched recursively (jpg/jpeg/png, any case).

  Labels follow the ImageFolder convention: the sorted names of the folder's immediate
  subfolders are the classes (files directly in the folder get label 0). The 'eval' split is
  the files `eval_list` names (a text file, one name per line: a path relative to the folder,
  or a bare file name, as in taming-transformers' data/ffhqvalidation.txt), or without one a
  deterministic fraction of files chosen by a hash of the relative path.
  """

  def __init__(self, folder: str, split: str, eval_fraction: float = 0.02, eval_list: str = ""):
    if not os.path.isdir(folder):
      raise FileNotFoundError(
          f"data.folder={folder!r} is not a directory; point --config.data.folder at a folder "
          "of .jpg/.png images (subfolders become class labels)."
      )
    if split not in ("train", "eval"):
      raise ValueError(f"folder split {split!r}: expected 'train' or 'eval'.")
    if split == "eval" and not eval_list and eval_fraction == 0:
      raise ValueError(
          "data.folder_eval_fraction=0 takes the eval split from data.folder_eval_list, which is "
          "empty; pass --config.data.folder_eval_list=FILE (one image name per line, e.g. "
          "taming-transformers' ffhqvalidation.txt; README 'CelebA-HQ and FFHQ'), or set "
          "data.folder_eval_fraction > 0."
      )
    listed = read_eval_list(eval_list) if eval_list else None
    found = set()
    class_names = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    class_index = {name: i for i, name in enumerate(class_names)}
    files, labels = [], []
    for root, dirs, names in os.walk(folder):
      dirs.sort()
      for name in sorted(names):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
          continue
        rel = os.path.relpath(os.path.join(root, name), folder)
        if listed is None:
          in_eval = (zlib.crc32(rel.encode()) % 10_000) < eval_fraction * 10_000
        else:
          match = {rel.replace(os.sep, "/"), name} & listed
          found |= match
          in_eval = bool(match)
        if in_eval != (split == "eval"):
          continue
        files.append(os.path.join(folder, rel))
        top = rel.split(os.sep)[0]
        labels.append(class_index.get(top, 0))
    if listed is not None and listed - found:
      missing = sorted(listed - found)
      raise ValueError(
          f"data.folder_eval_list={eval_list!r} names {len(missing)} of its {len(listed)} files "
          f"that are not under data.folder={folder!r} (e.g. {missing[0]!r}); point data.folder "
          "at the folder the list describes."
      )
    if not files:
      raise ValueError(
          f"no {'/'.join(IMAGE_EXTENSIONS)} images for split {split!r} under {folder!r} "
          f"(eval_fraction={eval_fraction}); add images or change data.folder_eval_fraction."
      )
    self.files, self.labels = files, labels
    self.num_classes = max(1, len(class_names))
    self.class_names = class_names

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index: int):
    return {"image": decode_image_file(self.files[index]), "label": self.labels[index]}


def read_eval_list(path: str) -> set[str]:
  """The file names a data.folder_eval_list file holds, one per line (blank lines skipped)."""
  if not fileio.exists(path) or fileio.path(path).is_dir():
    raise FileNotFoundError(
        f"data.folder_eval_list={path!r} is not a file; point it at a text "
        "file naming the eval images, one per line."
    )
  return {line.strip() for line in fileio.read_text(path).splitlines() if line.strip()}


def tfds_data_dir(data_dir: str | None = None) -> str:
  """The tfds data_dir in force: the given one, else $TFDS_DATA_DIR, else ~/tensorflow_datasets
  (tfds' own default)."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def with_recorded_data_dir(config):
  """`config` with a tfds source's empty data_dir replaced by the data_dir in force now
  (tfds_data_dir: $TFDS_DATA_DIR or ~/tensorflow_datasets), so that the run's config.json says
  where its data is. The launch scripts pass the location as $TFDS_DATA_DIR; evaluate and the
  notebook run later, where that variable is not set. Changes `config` in place; returns it."""
  data = config.get("data")  # the quickstart's config has its data in its stages'
  if data is not None and data.source == "tfds" and not data.data_dir:
    data.data_dir = fileio.absolute(tfds_data_dir())
  return config


def prepare_command(name: str, data_dir: str) -> str:
  return f"python -m vim_jax.tools.prepare_data --name={name} --data_dir={data_dir}"


def has_array_record(builder) -> bool:
  """Whether a prepared tfds builder's files include the ArrayRecord format."""
  formats = [builder.info.file_format, *getattr(builder.info, "alternative_file_formats", [])]
  return any(str(getattr(f, "value", f)) == "array_record" for f in formats)


class DatasetNotPreparedError(RuntimeError):
  """A tfds dataset that is not prepared (as ArrayRecord) in the data_dir a run reads."""


def open_tfds_builder(name: str, data_dir: str):
  """The tfds builder of a dataset prepared as ArrayRecord in data_dir; never downloads.

  Raises DatasetNotPreparedError naming the dataset, the data_dir and the prepare command.
  """
  import tensorflow_datasets as tfds  # lazy: loads TensorFlow (seconds); only tfds sources need it

  fix = (
      f"Prepare it once with\n  {prepare_command(name, data_dir)}\n(imagenet2012: put "
      "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org in "
      f"{os.path.join(data_dir, 'downloads', 'manual')} first; see the README)."
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends carry tfds' own explanation
    raise DatasetNotPreparedError(
        f"tfds dataset {name!r} could not be opened in data_dir="
        f"{data_dir!r}: {type(e).__name__}: {e}"
    ) from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r} (no "
        f"{builder.data_path}). {fix}"
    )
  if not has_array_record(builder):
    raise DatasetNotPreparedError(
        f"tfds dataset {name!r} in data_dir={data_dir!r} is prepared as "
        f"{builder.info.file_format}, but random access (tfds.data_source) needs array_record. "
        f"Prepare it again with\n  {prepare_command(name, data_dir)} --overwrite"
    )
  return builder


class TfdsSource:
  """A split of a tfds dataset prepared as ArrayRecord, read with random access.

  Opening it never downloads or prepares anything: a dataset that is not ready stops the run
  at start with the command that prepares it.
  """

  def __init__(
      self,
      name: str,
      split: str,
      data_dir: str | None = None,
      image_key: str = "image",
      label_key: str = "label",
  ):
    data_dir = tfds_data_dir(data_dir)
    builder = open_tfds_builder(name, data_dir)
    base_split = split.split("[")[0]
    if "+" not in split and base_split not in builder.info.splits:
      raise DatasetNotPreparedError(
          f"tfds dataset {name!r} in data_dir={data_dir!r} has no split {base_split!r}; it has "
          f"{sorted(builder.info.splits)}. Set --config.data.train_split / eval_split."
      )
    self.data = builder.as_data_source(split=split)
    self.image_key, self.label_key = image_key, label_key
    label_feature = self.data.dataset_info.features[label_key] if label_key else None
    self.num_classes = getattr(label_feature, "num_classes", 1) or 1

  def __len__(self):
    return len(self.data)

  def __getitem__(self, index: int):
    try:
      example = self.data[int(index)]
      image = np.asarray(example[self.image_key], dtype=np.uint8)
    except Exception as e:
      raise CorruptImageError(f"tfds example {index}: {type(e).__name__}: {e}") from e
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    label = int(example[self.label_key]) if self.label_key else 0
    return {"image": image[..., :3], "label": label}


class TokenSource:
  """Image tokens written by `python -m vim_jax.tools.pretokenize`: shards of
  {split}-NNNNN.tokens.npy (int32 [n, N]) and .labels.npy, memory-mapped."""

  def __init__(self, folder: str, split: str):
    meta_path = fileio.join(folder, "meta.json")
    if not fileio.exists(meta_path):
      raise FileNotFoundError(
          f"data.tokens_dir={folder!r} has no meta.json; write it with `python -m "
          "vim_jax.tools.pretokenize --config=<vim config> --out=<dir>`."
      )
    self.meta = fileio.read_json(meta_path)
    shards = fileio.glob(folder, f"{split}-*.tokens.npy")
    if not shards:
      raise FileNotFoundError(f"no {split}-*.tokens.npy shards in {folder!r}.")
    # Local shards are memory-mapped; shards on GCS are read whole (int32, 4 kB per image).
    self.tokens = [fileio.load_npy(p, mmap=True) for p in shards]
    self.labels = [fileio.load_npy(p.replace(".tokens.npy", ".labels.npy")) for p in shards]
    self.offsets = np.cumsum([0] + [len(t) for t in self.tokens])
    self.num_classes = self.meta["num_classes"]

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, index: int):
    shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
    i = int(index - self.offsets[shard])
    return {"tokens": np.asarray(self.tokens[shard][i]), "label": int(self.labels[shard][i])}


def build_source(data_config, split: str, image_size: int, seed: int):
  """The source named by config.data for split 'train' or 'eval'."""
  kind = data_config.source
  if kind == "shapes":
    size = data_config.shapes_train_size if split == "train" else data_config.shapes_eval_size
    style = shapes.ShapesStyle(
        data_config.shapes_num_colors, data_config.shapes_gradient, *data_config.shapes_radius
    )
    return ShapesSource(
        split,
        size,
        data_config.shapes_resolution or image_size,
        data_config.shapes_seed,
        data_config.num_classes,
        style,
    )
  if kind == "folder":
    return FolderSource(
        data_config.folder, split, data_config.folder_eval_fraction, data_config.folder_eval_list
    )
  if kind == "tfds":
    tfds_split = data_config.train_split if split == "train" else data_config.eval_split
    return TfdsSource(
        data_config.name,
        tfds_split,
        data_config.data_dir or None,
        data_config.image_key,
        data_config.label_key,
    )
  if kind == "tokens":
    return TokenSource(data_config.tokens_dir, split)
  raise ValueError(f"data.source={kind!r}; expected 'shapes', 'tfds', 'folder' or 'tokens'.")
