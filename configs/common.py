"""What the config files share: the data, FID and mesh sections, a Transformer stack's block
and kernel options, the variant argument, and the CPU smoke variants (`:tiny`).

A recipe (model sizes, optimizer, schedule, loss weights, data) is written out in its own
file; only sections that are the same in every config live here. Config files import it as
`from configs import common`, which works when they are loaded by path from the repository
root (`python -m vim_jax.main --config=configs/...`, the cwd is on sys.path) and when they are
imported as `configs.<name>`.
"""

from __future__ import annotations

import ml_collections

from vim_jax.infra import parallel

# Logical axis -> mesh axis rules (vim_jax/infra/parallel.py); a config may replace them.
AXIS_RULES = parallel.DEFAULT_AXIS_RULES


def parse_variant(arg: str | None, allowed) -> set[str]:
  """'tiny,noperceptual' -> {'tiny', 'noperceptual'}; unknown names are an error."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = names - set(allowed)
  if unknown:
    raise ValueError(
        f"config variant {sorted(unknown)[0]!r}; expected a comma-separated subset "
        f"of {list(allowed)} or none."
    )
  return names


def stack_kernels(remat_policy: str = "none") -> dict:
  """How a Transformer stack runs (vim_jax/models/transformer.py): the same math either way."""
  return dict(
      # What the backward pass recomputes: 'none', 'full' (whole blocks; least memory) or
      # 'minimal' (keeps the weight matmuls' outputs; recomputes attention and elementwise ops).
      remat_policy=remat_policy,
      # Blocks under nn.scan: compiled once instead of once per layer. Checkpoints of the two
      # layouts are not interchangeable (the run says so by name when they differ).
      scan_layers=True,
      # 'auto' (splash on TPU, cuDNN on GPU in bf16/fp16, else XLA), 'xla', 'cudnn', 'splash';
      # see vim_jax/models/attention.py.
      attention="auto",
      attention_block=512,  # splash attention's tile (the largest multiple of 128 dividing L)
  )


def block_options() -> dict:
  """A Transformer block's details, the paper's; other published ViT-VQGANs differ in them
  (configs/enhancing_vitvq_*.py)."""
  return dict(
      mlp_activation="gelu",  # 'gelu' (tanh approximation) or 'tanh'
      qkv_bias=True,  # biases on the query/key/value projections
      layer_norm_eps=1e-6,
  )


def vit_stack(
    *,
    num_layers: int,
    width: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    remat_policy: str = "none",
) -> ml_collections.ConfigDict:
  """A stage-1 encoder or decoder of the given shape, with the paper's block details."""
  return ml_collections.ConfigDict(
      dict(
          num_layers=num_layers,
          width=width,
          num_heads=num_heads,
          head_dim=head_dim,
          mlp_dim=mlp_dim,
          output_ffn_dim=0,  # hidden width of the Linear-tanh-Linear output head; 0 = mlp_dim
          dropout=0.0,
          **block_options(),
          **stack_kernels(remat_policy),
      )
  )


def data_config(**overrides) -> ml_collections.ConfigDict:
  """Every data source's fields (vim_jax/data/sources.py), ImageNet from tfds by default."""
  data = ml_collections.ConfigDict(
      dict(
          source="tfds",  # 'tfds' | 'folder' | 'shapes' (embedded, generated in code) | 'tokens'
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
          # A text file naming the eval files, one per line (a path relative to the folder, or a
          # file name), e.g. taming-transformers' data/ffhqvalidation.txt; the other files are the
          # train split. '' = folder_eval_fraction decides.
          folder_eval_list="",
          # shapes: the embedded dataset.
          shapes_train_size=50_000,
          shapes_eval_size=512,
          shapes_seed=1234,
          shapes_resolution=0,  # render size; 0 = image_size (rendered size is then resized)
          shapes_num_colors=0,  # 0 = any RGB colour; k = a palette of k colours (2..12)
          shapes_gradient=True,  # gradient backgrounds (else solid)
          shapes_radius=(0.15, 0.28),  # shape radius range, in image widths
          num_classes=6,  # shapes classes (1..6)
          # tokens: stage 2 only, tokens written by vim_jax.tools.pretokenize.
          tokens_dir="",
          random_flip=True,
          # Decoding threads per process; 0 = one per CPU core the process may use (more
          # threads than cores only contend; benchmarks/RESULTS.md, "Input pipeline: images/s
          # by worker count").
          # Raise it when reads wait on the network (gs:// data_dir).
          num_workers=0,
      )
  )
  data.update(overrides)
  return data


def fid_config(**overrides) -> ml_collections.ConfigDict:
  """FID / IS during training (vim_jax/evaluators/fid.py); off until `every` > 0."""
  fid = ml_collections.ConfigDict(
      dict(
          every=0,  # steps between evaluations; 0 = off
          # FID InceptionV3 made by `python -m vim_jax.tools.convert_inception`; checked at start.
          inception_weights="weights/pt_inception-2015-12-05.msgpack",
          resize="bilinear",  # pytorch-fid's; see vim_jax.models.inception.RESIZE_METHODS
          batch_size=64,  # images per Inception batch (rounded to the device count)
      )
  )
  fid.update(overrides)
  return fid


def mesh_config(*, data: int, fsdp: int, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 = the remaining devices. FSDP: data=1, fsdp=-1. TP: tensor=N.
  dcn_*: the same across slices (multi-slice) or hosts; each axis is size x dcn_size."""
  return ml_collections.ConfigDict(
      dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  )


# ----------------------------------------------------------------------------------------------
# Variants.
# ----------------------------------------------------------------------------------------------
STAGE1_VARIANTS = ("tiny", "noperceptual")


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a stage-1 config to a CPU smoke size on the embedded dataset (seconds).

  The adversarial term stays on (with a small discriminator); the perceptual term is off
  because it needs converted LPIPS weights (turn it on with --config.loss.perceptual=0.1 once
  --config.perceptual_weights points at a file)."""
  c.image_size = 32
  for stack in (c.model.encoder, c.model.decoder):
    stack.update(num_layers=2, width=64, num_heads=2, head_dim=32, mlp_dim=128, output_ffn_dim=0)
  c.model.update(patch_size=4, codebook_size=256, code_dim=8, dtype="float32")
  c.data.update(source="shapes", shapes_train_size=2048, shapes_eval_size=64, num_workers=4)
  # No warmup: the first step already moves the params, so the tests that compare runs
  # (1 vs 8 devices, 1 vs 2 processes, straight vs resumed) compare trained values.
  c.optimizer.update(peak_lr=1e-3, warmup_steps=0, end_lr=1e-4)
  c.loss.perceptual = 0.0
  c.discriminator.update(channel_base=256, max_channels=64, r1_interval=4, lr=1e-3)
  c.update(
      batch_size=16,
      eval_batch_size=16,
      total_steps=20,
      log_every=5,
      eval_every=10,
      checkpoint_every=10,
      num_grid_images=8,
  )
  return c


def apply_stage1_variants(c: ml_collections.ConfigDict, variants: set[str]):
  """noperceptual: the paper's tokenizer for representation learning (VGG saw ImageNet
  labels, so a linear probe on its tokens would leak them). tiny: CPU smoke size."""
  if "noperceptual" in variants:
    c.loss.perceptual = 0.0
  if "tiny" in variants:
    c = make_tiny(c)
  return c


def make_enhancing_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """make_tiny at 64 px with their patch (8) and code dimension (32): the tests' layout."""
  c = make_tiny(c)
  c.image_size = 64
  c.model.update(patch_size=8, code_dim=32, codebook_size=256)
  return c


def make_tiny_stage2(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU smoke size on the embedded data (needs a tiny tokenizer workdir)."""
  c.image_size = 32
  c.model.update(
      num_layers=2,
      width=64,
      num_heads=2,
      head_dim=32,
      mlp_dim=128,
      num_classes=6,
      dtype="float32",
      remat_policy="none",
  )
  c.data.update(source="shapes", shapes_train_size=2048, shapes_eval_size=64, num_workers=4)
  c.optimizer.update(peak_lr=1e-3, warmup_steps=0, decay_start=10)  # as make_tiny: no warmup
  c.update(
      batch_size=16,
      eval_batch_size=16,
      num_eval_images=32,
      total_steps=20,
      log_every=5,
      eval_every=10,
      checkpoint_every=10,
      num_grid_images=8,
      grad_accum_steps=1,
  )
  c.sampling.batch_size = 8  # sequences per device: 64 images on the tests' 8 CPU devices
  c.probe.update(block=1, steps=50, batch_size=32, num_train_images=256, num_eval_images=64)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
