"""A fake ImageNet 2012 in the published archive layout, small enough for a test.

The real manual files are two tars:
- `ILSVRC2012_img_train.tar`: one tar per synset (`n01440764.tar`, ...), each holding that
  class's JPEGs (`n01440764_10026.JPEG`, ...). Among them are 22 CMYK JPEGs and one PNG saved
  under a `.JPEG` name, which tfds' imagenet2012 builder recognises by file name and re-encodes.
- `ILSVRC2012_img_val.tar`: 50,000 JPEGs named `ILSVRC2012_val_00000001.JPEG` ...; the labels
  are not in the archive but in tfds' `validation_labels.txt`, one synset per line in the
  sorted order of those names.

`write_fake_imagenet` writes both with a few real synsets, including the real names of one
CMYK file and of the PNG file, so the builder's repair path runs exactly as on the real data.
Images have random sizes and smooth random colours, so they decode to distinct pictures.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

# Synsets present in tfds' labels.txt (class indices 0, 59, 230, 1).
SYNSETS = ("n01440764", "n01739381", "n02105855", "n01443537")
# Real file names from the archive that the builder repairs (imagenet2012_dataset_builder.py).
CMYK_FILE = "n01739381_1309.JPEG"
PNG_FILE = "n02105855_2933.JPEG"


def _picture(rng: np.random.Generator, sides: tuple[int, int]) -> Image.Image:
  """An RGB picture with random sides in [sides[0], sides[1]]: a colour gradient plus noise."""
  height, width = rng.integers(sides[0], sides[1] + 1, size=2)
  corners = rng.uniform(0, 255, size=(2, 2, 3))
  ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
  image = (1 - ys) * ((1 - xs) * corners[0, 0] + xs * corners[0, 1]) + ys * (
      (1 - xs) * corners[1, 0] + xs * corners[1, 1]
  )
  image = image + rng.normal(0, 12, size=image.shape)
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _encoded(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  if fmt == "CMYK":
    image.convert("CMYK").save(buffer, format="JPEG", quality=90)
  else:
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(
    manual_dir: str,
    images_per_synset: int = 6,
    num_val: int = 8,
    seed: int = 0,
    sides: tuple[int, int] = (40, 96),
    synsets: tuple[str, ...] = SYNSETS,
) -> dict:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into manual_dir.

  Returns {'train': number of train images, 'validation': number of val images,
  'train_files': {file name: synset}, 'repaired': {CMYK_FILE / PNG_FILE: its RGB pixels, uint8
  [H, W, 3]}}.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  train_files, repaired = {}, {}
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train_tar:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as synset_tar:
        names = [f"{synset}_{10_000 + i}.JPEG" for i in range(images_per_synset)]
        special = {CMYK_FILE: "CMYK", PNG_FILE: "PNG"}
        names += [name for name in special if name.startswith(synset)]
        for name in names:
          picture = _picture(rng, sides)
          _add(synset_tar, name, _encoded(picture, special.get(name, "JPEG")))
          train_files[name] = synset
          if name in special:
            repaired[name] = np.asarray(picture)
      _add(train_tar, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val_tar:
    for i in range(1, num_val + 1):
      _add(val_tar, f"ILSVRC2012_val_{i:08d}.JPEG", _encoded(_picture(rng, sides), "JPEG"))
  return {
      "train": len(train_files),
      "validation": num_val,
      "train_files": train_files,
      "repaired": repaired,
  }
