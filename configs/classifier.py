"""Small conv classifier on the embedded shapes data, for rejection sampling and for the class
accuracy of generated samples.

  python -m vim_jax.main --config=configs/classifier.py --workdir=workdirs/classifier

Reaches 99.2% top-1 on the shapes eval split in 1000 steps (about 75 seconds on 2 CPU cores).
Train it on any other labelled data with --config.data.* (its images must match the
generator's image_size).
"""

from vim_jax import config_base


def get_config(arg=None):
  config_base.parse_variant(arg, allowed=())
  return config_base.classifier_config()
