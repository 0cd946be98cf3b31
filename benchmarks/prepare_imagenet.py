"""How long `python -m vim_jax.tools.prepare_data --name=imagenet2012` takes, per image.

  python benchmarks/prepare_imagenet.py [--synsets=4] [--images_per_synset=250]

Writes a fake ImageNet in the published layout (tests/fake_imagenet.py) with ImageNet-sized
JPEGs (sides 333-500 px, near the real median of 500x375), prepares it with the command's own
`prepare` function into a temporary data_dir, and prints images/s and bytes written. The last
rows extrapolate to the real archives (1,281,167 train and 50,000 validation images, 154.6 GB),
assuming the same per-image cost: tfds' imagenet2012 builder generates in one Python process,
so the machine's single-core speed and disk decide the time, not its core count.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fake_imagenet  # noqa: E402

from vim_jax.tools import prepare_data  # noqa: E402

REAL_IMAGES = 1_281_167 + 50_000
REAL_ARCHIVE_BYTES = 147_897_477_120 + 6_744_924_160


def folder_bytes(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(root, name))
      for root, _, names in os.walk(path)
      for name in names
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--synsets", type=int, default=4, help="classes in the fake archive")
  parser.add_argument("--images_per_synset", type=int, default=250)
  parser.add_argument("--num_val", type=int, default=200)
  args = parser.parse_args()
  synsets = prepare_data._imagenet_synsets()
  chosen = tuple(sorted(synsets)[: args.synsets])
  with tempfile.TemporaryDirectory() as tmp:
    manual, data_dir = os.path.join(tmp, "manual"), os.path.join(tmp, "data")
    info = fake_imagenet.write_fake_imagenet(
        manual, args.images_per_synset, args.num_val, sides=(333, 500), synsets=chosen
    )
    images = info["train"] + info["validation"]
    archive_bytes = folder_bytes(manual)
    start = time.perf_counter()
    prepare_data.prepare("imagenet2012", data_dir, manual)
    seconds = time.perf_counter() - start
    written = folder_bytes(os.path.join(data_dir, "imagenet2012"))
  rate, byte_rate = images / seconds, archive_bytes / seconds
  # Real JPEGs are larger than ours (110 kB on average): extrapolate by images and by bytes.
  hours = sorted([REAL_IMAGES / rate / 3600, REAL_ARCHIVE_BYTES / byte_rate / 3600])
  print()
  print(
      "| archive | images | archive MB | written MB | written / archive | time | images/s "
      "| archive MB/s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  print(
      f"| fake, 333-500 px JPEGs | {images} | {archive_bytes / 1e6:.1f} | "
      f"{written / 1e6:.1f} | {written / archive_bytes:.3f} | {seconds:.1f} s | {rate:.0f} | "
      f"{byte_rate / 1e6:.1f} |"
  )
  print(
      f"| ILSVRC2012 train + val (extrapolated) | {REAL_IMAGES:,} | "
      f"{REAL_ARCHIVE_BYTES / 1e6:,.0f} | "
      f"~{REAL_ARCHIVE_BYTES * written / archive_bytes / 1e6:,.0f} | | "
      f"{hours[0]:.1f}-{hours[1]:.1f} h | | |"
  )


if __name__ == "__main__":
  main()
