"""Building blocks of the config files in configs/ (importable, so configs stay short).

A config file is the whole experiment: every knob the code reads is here, with its default.
"""

from __future__ import annotations

import ml_collections

from vim_jax import parallel

# Paper Table 1 (stage 1): blocks, heads, model dim, MLP dim. Heads are 64 wide, so Large's
# attention width is 16 x 64 = 1024 while its model width is 1280.
VIT_SIZES = {
    "small": dict(num_layers=8, width=512, num_heads=8, head_dim=64, mlp_dim=2048),
    "base": dict(num_layers=12, width=768, num_heads=12, head_dim=64, mlp_dim=3072),
    "large": dict(num_layers=32, width=1280, num_heads=16, head_dim=64, mlp_dim=5120),
}

# Reported parameter counts [paper?]; they match one stack (encoder or decoder) each.
PAPER_PARAMS_PER_STACK = {"small": 32e6, "base": 91e6, "large": 599e6}


def vit_stack(size: str) -> ml_collections.ConfigDict:
  if size not in VIT_SIZES:
    raise ValueError(f"ViT size {size!r}; expected one of {sorted(VIT_SIZES)}.")
  return ml_collections.ConfigDict(dict(
      **VIT_SIZES[size],
      output_ffn_dim=0,  # hidden width of the Linear-tanh-Linear output head; 0 = mlp_dim
      dropout=0.0,
      remat=False,  # rematerialise blocks in the backward pass (saves memory, costs compute)
  ))


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="tfds",  # 'tfds' | 'folder' | 'shapes' (embedded, generated in code)
      # tfds: read with tfds.data_source (ArrayRecord format, see README).
      name="imagenet2012",
      data_dir="",  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
      train_split="train",
      eval_split="validation",
      image_key="image",
      label_key="label",
      # folder: images under this path (subfolders = classes).
      folder="",
      folder_eval_fraction=0.02,  # share of files (by path hash) held out for eval
      # shapes: the embedded dataset.
      shapes_train_size=50_000,
      shapes_eval_size=512,
      shapes_seed=1234,
      shapes_resolution=0,  # render size; 0 = image_size (rendered size is then resized)
      num_classes=6,  # shapes classes (1..6)
      random_flip=True,
      num_workers=16,  # decoding threads per process
  ))


def stage1_config(encoder: str, decoder: str) -> ml_collections.ConfigDict:
  """ViT-VQGAN with the paper's stage-1 hyperparameters on ImageNet 256x256."""
  c = ml_collections.ConfigDict()
  c.trainer = "vitvq"
  c.seed = 0
  c.image_size = 256

  c.model = ml_collections.ConfigDict(dict(
      encoder=vit_stack(encoder),
      decoder=vit_stack(decoder),
      patch_size=8,  # 256 / 8 = 32 x 32 = 1024 tokens
      codebook_size=8192,
      code_dim=32,  # factorized lookup dimension
      l2_normalize=True,  # cosine lookup on unit vectors
      beta=0.25,  # commitment weight
      logit_laplace=True,  # decoder predicts (mu, log b) per channel
      logit_laplace_eps=0.1,  # inputs squashed to [eps, 1 - eps] before the logit
      dtype="bfloat16",  # compute dtype; params stay float32
  ))
  # Weights of each loss term (paper: 1.0 L2 + 0.1 logit-Laplace + VQ; perceptual and
  # adversarial terms come with their own issue).
  c.loss = ml_collections.ConfigDict(dict(l2=1.0, logit_laplace=0.1, vq=1.0))
  c.optimizer = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.99, eps=1e-8,
      peak_lr=1e-4, warmup_steps=50_000, end_lr=5e-5,  # linear warmup, cosine to end_lr
      weight_decay=1e-4,  # decoupled, on matrices only
      grad_clip_norm=1.0,  # [choice]; 0 disables
  ))
  c.data = data_config()

  c.batch_size = 256  # global
  c.total_steps = 500_000
  c.eval_batch_size = 256
  c.num_eval_images = -1  # -1 = the whole eval split
  c.eval_usage_chunk = 256  # images per batch in the paper's codebook-usage metric
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.num_grid_images = 16

  # Mesh axes sizes; -1 = the remaining devices. FSDP: data=1, fsdp=-1. TP: tensor=N.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.axis_rules = parallel.DEFAULT_AXIS_RULES
  return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a stage-1 config to a CPU smoke size on the embedded dataset (seconds)."""
  c.image_size = 32
  for stack in (c.model.encoder, c.model.decoder):
    stack.update(num_layers=2, width=64, num_heads=2, head_dim=32, mlp_dim=128, output_ffn_dim=0)
  c.model.update(patch_size=4, codebook_size=256, code_dim=8, dtype="float32")
  c.data.update(source="shapes", shapes_train_size=2048, shapes_eval_size=64, num_workers=4)
  c.optimizer.update(peak_lr=1e-3, warmup_steps=5, end_lr=1e-4)
  c.update(batch_size=16, eval_batch_size=16, total_steps=20, log_every=5, eval_every=10,
           checkpoint_every=10, num_grid_images=8)
  return c


def parse_variant(arg: str | None, allowed=("tiny",)) -> str:
  arg = (arg or "").strip()
  if arg and arg not in allowed:
    raise ValueError(f"config variant {arg!r}; expected one of {list(allowed)} or none.")
  return arg
