"""One process of the 2-process check in tests/test_multihost.py: the eval split's Inception
statistics (the gFID reference a stage-2 run computes without fid.reference_stats), written by
process 0.

  python tests/multihost_fid_stats.py COORDINATOR PROCESS_ID INCEPTION_FILE OUT.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def reference_config():
  """The tiny VIM config's shapes eval split, 20 images in batches of 8: the last batch holds
  4 real images, all in process 0's share."""
  from configs import vim_base

  config = vim_base.get_config("tiny")
  config.update(num_eval_images=20, eval_batch_size=8)
  return config


def main(coordinator: str, process_id: int, inception_file: str, out: str):
  jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
  from vim_jax.evaluators import fid, paper_metrics

  extractor = fid.FeatureExtractor(inception_file, batch_size=8)
  stats = paper_metrics.reference_stats(reference_config(), extractor)
  if jax.process_index() == 0:
    stats.save(out)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
