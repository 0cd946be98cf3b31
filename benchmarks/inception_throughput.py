"""Throughput of FID/IS feature extraction (InceptionV3 at 299 px) through fid.FeatureExtractor.

  python benchmarks/inception_throughput.py [--images 256] [--batch_sizes 16,64]

Random weights (initialised by Flax; speed does not depend on the values), written to a temp
file and loaded the way real runs load the converted pytorch-fid weights. Times the whole
streaming path: host uint8 batch -> device -> resize to 299 -> Inception -> pool features and
softmax back on the host -> float64 running moments. The first batch (compilation) is excluded.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vim_jax.evaluators import fid
from vim_jax.models import inception  # noqa: E402
from vim_jax.tools import weights_io  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256, help="images per measurement")
  parser.add_argument("--batch_sizes", default="16,64")
  parser.add_argument("--sizes", default="32,256", help="input resolutions (resized to 299)")
  args = parser.parse_args()
  params = jax.jit(inception.InceptionV3FID().init)(
      jax.random.key(0), jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3))
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "inception_random.msgpack")
    weights_io.save_params(jax.device_get(params), path)
    for size in [int(s) for s in args.sizes.split(",")]:
      for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        extractor = fid.FeatureExtractor(path, batch_size=batch_size)
        images = np.random.default_rng(0).integers(
            0, 256, (extractor.batch_size, size, size, 3), dtype=np.uint8
        )
        extractor(images)  # compile
        batches = max(args.images // extractor.batch_size, 1)
        start = time.perf_counter()
        extractor.extract((images for _ in range(batches)), "benchmark")
        seconds = time.perf_counter() - start
        rows.append(
            (
                size,
                extractor.batch_size,
                batches * extractor.batch_size,
                batches * extractor.batch_size / seconds,
            )
        )
  devices = jax.devices()
  print(
      f"\nInception feature extraction on {len(devices)} x {devices[0].device_kind} "
      f"({devices[0].platform})"
  )
  print("| input px | batch | images | images/s |")
  print("|---|---|---|---|")
  for size, batch, n, rate in rows:
    print(f"| {size} | {batch} | {n} | {rate:.1f} |")


if __name__ == "__main__":
  main()
