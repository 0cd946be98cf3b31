"""Small conv classifier on the embedded shapes data, for rejection sampling and for the class
accuracy of generated samples.

  python -m vim_jax.main --config=configs/classifier.py --workdir=workdirs/classifier

Reaches 99.2% top-1 on the shapes eval split in 1000 steps (about 75 seconds on 2 CPU cores).
Train it on any other labelled data with --config.data.* (its images must match the
generator's image_size).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  common.parse_variant(arg, allowed=())
  c = ml_collections.ConfigDict()
  c.trainer = "classifier"
  c.seed = 0
  c.image_size = 32
  c.model = ml_collections.ConfigDict(dict(widths=(16, 32, 64)))  # conv widths per stage
  c.optimizer = ml_collections.ConfigDict(dict(lr=3e-3, weight_decay=1e-4))
  c.data = common.data_config(
      source="shapes", shapes_train_size=50_000, shapes_eval_size=512, num_workers=4
  )
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_eval_images = -1  # -1 = the whole eval split
  c.total_steps = 1000
  c.log_every = 100
  c.keep_checkpoints = 1
  c.mesh = common.mesh_config(data=-1, fsdp=1)
  # The training loop lays out every trainer's state and batches by these rules.
  c.axis_rules = common.AXIS_RULES
  return c
