"""Input pipeline throughput: training batches at 256 px from a folder of JPEGs, by worker count.

  python benchmarks/input_pipeline.py [--folder=DIR] [--workers=1,2,4,8,16] [--batches=12]

Without --folder it writes 512 JPEGs of 500x375 (ImageNet's typical size), textured so they
compress like photographs, into a temporary folder. Each worker count then decodes, resizes,
crops and flips --batches training batches of 64 through vim_jax.data.pipeline (what the
trainers read), after one warm-up batch; the table gives images/s. Run it on an otherwise idle
machine: the threads share its cores with nothing else.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vim_jax.data import pipeline, sources  # noqa: E402


def write_jpegs(folder: str, count: int = 512, size=(500, 375)):
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0 : size[1], 0 : size[0]]
  for i in range(count):
    fx, fy = rng.uniform(0.005, 0.05, 2)
    base = np.stack([np.sin(fx * x + c) * np.cos(fy * y - c) for c in rng.uniform(0, 6, 3)], -1)
    noise = rng.normal(0, 0.15, (size[1], size[0], 3))
    image = np.clip((base + noise) * 100 + 128, 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def images_per_second(source, workers: int, batches: int, batch_size: int = 64) -> float:
  data = pipeline.InputPipeline(source, batch_size, 256, seed=0, train=True, num_workers=workers)
  iterator = data.iterate(0)
  next(iterator)  # warm-up: threads started, first files read
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  iterator.close()
  return batches * batch_size / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", default="", help="a folder of JPEGs (default: generated)")
  parser.add_argument("--workers", default="1,2,4,8,16")
  parser.add_argument("--batches", type=int, default=12)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder
    if not folder:
      folder = tmp
      write_jpegs(folder)
    source = sources.FolderSource(folder, "train", eval_fraction=0.0)
    cores = pipeline.available_cpus()
    print(
        f"{len(source)} images from {args.folder or 'generated 500x375 JPEGs'}, 256 px "
        f"training batches of 64; {cores} CPU cores (num_workers=0 means {cores})"
    )
    print("| num_workers | images/s |")
    print("|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
      print(f"| {workers} | {images_per_second(source, workers, args.batches):.0f} |", flush=True)


if __name__ == "__main__":
  main()
