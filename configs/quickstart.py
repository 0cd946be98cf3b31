"""Quickstart: train the stage-1 tokenizer on the embedded shapes dataset, on 2 CPU cores.

  python -m vim_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

No download: the data is generated in code. Writes checkpoints, TensorBoard logs and image
grids of eval inputs next to their reconstructions under the workdir. Target on the eval split
(measured on a 2-core machine, see README): >= 24 dB PSNR and >= 80% codebook usage in
under 5 minutes.
"""

from vim_jax import config_base


def get_config(arg=None):
  config_base.parse_variant(arg, allowed=())
  c = config_base.stage1_config("small", "small")
  c.image_size = 32
  for stack in (c.model.encoder, c.model.decoder):
    stack.update(num_layers=2, width=128, num_heads=4, head_dim=32, mlp_dim=256)
  c.model.update(patch_size=4, codebook_size=512, code_dim=4, dtype="float32")
  c.data.update(source="shapes", shapes_train_size=50_000, shapes_eval_size=512, num_workers=4)
  c.optimizer.update(peak_lr=2e-3, warmup_steps=100, end_lr=1e-4, weight_decay=1e-4)
  c.update(batch_size=32, eval_batch_size=64, total_steps=2500, log_every=100, eval_every=500,
           checkpoint_every=500, num_grid_images=16)
  return c
