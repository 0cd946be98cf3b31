"""Building blocks of the config files in configs/ (importable, so configs stay short).

A config file is the whole experiment: every knob the code reads is here, with its default.
"""

from __future__ import annotations

import ml_collections

from vim_jax.infra import parallel

# Paper Table 1 (stage 1): blocks, heads, model dim, MLP dim. Heads are 64 wide, so Large's
# attention width is 16 x 64 = 1024 while its model width is 1280.
VIT_SIZES = {
    "small": dict(num_layers=8, width=512, num_heads=8, head_dim=64, mlp_dim=2048),
    "base": dict(num_layers=12, width=768, num_heads=12, head_dim=64, mlp_dim=3072),
    "large": dict(num_layers=32, width=1280, num_heads=16, head_dim=64, mlp_dim=5120),
}

# Stage-1 training throughput on 128 TPUv4 cores (a v4-128), images/s [paper, Table 2], by
# (encoder, decoder) size at 256 px and batch 256.
PAPER_STAGE1_THROUGHPUT = {("small", "small"): 1520, ("base", "base"): 960,
                           ("small", "large"): 384}

# Reported parameter counts [paper?]; they match one stack (encoder or decoder) each.
PAPER_PARAMS_PER_STACK = {"small": 32e6, "base": 91e6, "large": 599e6}


def vit_size_of(stack) -> str | None:
  """The Table-1 size name a stack config has the shape of (None if none)."""
  for name, shape in VIT_SIZES.items():
    if all(stack.get(k) == v for k, v in shape.items()):
      return name
  return None


def vit_stack(size: str) -> ml_collections.ConfigDict:
  if size not in VIT_SIZES:
    raise ValueError(f"ViT size {size!r}; expected one of {sorted(VIT_SIZES)}.")
  return ml_collections.ConfigDict(dict(
      **VIT_SIZES[size],
      output_ffn_dim=0,  # hidden width of the Linear-tanh-Linear output head; 0 = mlp_dim
      dropout=0.0,
      # Block details other published ViT-VQGANs differ in (configs/enhancing_vitvq_*.py):
      mlp_activation="gelu",  # 'gelu' (tanh approximation) or 'tanh'
      qkv_bias=True,  # biases on the query/key/value projections
      layer_norm_eps=1e-6,
      **stack_kernels(),
  ))


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


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
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
      # Decoding threads per process; 0 = one per CPU core the process may use (more threads
      # than cores only contend: 2 cores decoded 639 img/s with 4 threads, 372 with 16).
      # Raise it when reads wait on the network (gs:// data_dir).
      num_workers=0,
  ))


def stage1_config(encoder: str, decoder: str) -> ml_collections.ConfigDict:
  """ViT-VQGAN with the paper's stage-1 hyperparameters on ImageNet 256x256."""
  c = ml_collections.ConfigDict()
  c.trainer = "vitvq"
  c.seed = 0
  # The PRNG of the train step's dropout masks (vim_jax/infra/prng.py): auto = rbg (XLA's
  # RngBitGenerator, cheap on TPU, MaxText's choice) on TPU and threefry elsewhere; or threefry,
  # rbg, unsafe_rbg. Init keys stay threefry: a seed gives the same params on every backend.
  c.dropout_rng = "auto"
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
      # For other published ViT-VQGANs (vim_jax/models/tokenizer.py's docstring): 'learned' or
      # 'sincos' (fixed 2-D); the Linear-tanh-Linear head after each stack (False: none, and one
      # linear map per token to pixels); the range the network works in ('minus_one_to_one' or
      # 'zero_to_one'; callers always use [-1, 1]).
      position_embedding="learned",
      output_ffn=True,
      pixel_range="minus_one_to_one",
  ))
  # Weights of each loss term: L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-Laplace
  # + 1.0 L_2 (paper). A weight of 0 removes the term and, for perceptual/adversarial, its
  # network.
  c.loss = ml_collections.ConfigDict(dict(
      l2=1.0, logit_laplace=0.1, vq=1.0, perceptual=0.1, adversarial=0.1))
  # LPIPS (VGG16, v0.1) Flax weights made by `python -m vim_jax.tools.convert_lpips`. Needed when
  # loss.perceptual > 0; when the file exists, eval also reports eval/lpips.
  c.perceptual_weights = "weights/lpips_vgg16_v0.1.msgpack"
  # StyleGAN2 discriminator, trained in the same step as the tokenizer from start_step on.
  c.discriminator = ml_collections.ConfigDict(dict(
      # Width at resolution r: min(max_channels, channel_base // r). 64 x image_size gives 64
      # channels at full resolution, StyleGAN2's 256 px setting; scale it with image_size.
      channel_base=16384,
      max_channels=512,
      mbstd_group_size=4,
      loss="non_saturating",  # or 'hinge'
      r1_gamma=10.0,  # R1 weight gamma (penalty gamma / 2 * E||grad D(x)||^2) [choice]
      r1_interval=16,  # lazy R1 every N steps (StyleGAN2)
      lecam_weight=0.0,  # LeCam regularisation (Tseng et al. 2021); 0 = off
      lecam_ema_decay=0.99,
      start_step=0,  # the authors train G and D together from step 0
      # Scale loss.adversarial by ||dL_rec/dx|| / ||dL_adv/dx|| at the tokenizer's outputs
      # (taming VQGAN's balance, taken at the outputs instead of the last layer's weights), so
      # the GAN's pull stays a fixed fraction of the reconstruction's. The paper uses a fixed
      # weight (False); True keeps short or small-data runs from losing PSNR to the GAN.
      adaptive_weight=False,
      lr=1e-4, b1=0.9, b2=0.99,  # Adam, constant lr
  ))
  c.ema_decay = 0.0  # EMA of the tokenizer's params for eval (e.g. 0.999); 0 = off
  c.optimizer = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.99, eps=1e-8,
      peak_lr=1e-4, warmup_steps=50_000, end_lr=5e-5,  # linear warmup, cosine to end_lr
      weight_decay=1e-4,  # decoupled, on matrices only
      grad_clip_norm=1.0,  # [choice]; 0 disables
  ))
  c.data = data_config()

  c.batch_size = 256  # global
  # Microbatches per optimizer step (gradient accumulation): the same update as one batch of
  # batch_size, with the activations of batch_size / grad_accum_steps at a time.
  c.grad_accum_steps = 1
  c.total_steps = 500_000
  c.eval_batch_size = 256
  c.num_eval_images = -1  # -1 = the whole eval split
  c.eval_usage_chunk = 256  # images per batch in the paper's codebook-usage metric
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.num_grid_images = 16
  # rFID / IS of the reconstructions during training, in the eval pass (its num_eval_images
  # images) every fid.every steps; python -m vim_jax.evaluate does the same after training.
  c.fid = fid_config()

  # Mesh axes sizes; -1 = the remaining devices. FSDP: data=1, fsdp=-1. TP: tensor=N.
  # dcn_*: the same across slices (multi-slice) or hosts; each axis is size x dcn_size.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  c.axis_rules = parallel.DEFAULT_AXIS_RULES
  return c


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
  c.update(batch_size=16, eval_batch_size=16, total_steps=20, log_every=5, eval_every=10,
           checkpoint_every=10, num_grid_images=8)
  return c


STAGE1_VARIANTS = ("tiny", "noperceptual")


def parse_variant(arg: str | None, allowed=STAGE1_VARIANTS) -> set[str]:
  """'tiny,noperceptual' -> {'tiny', 'noperceptual'}; unknown names are an error."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = names - set(allowed)
  if unknown:
    raise ValueError(f"config variant {sorted(unknown)[0]!r}; expected a comma-separated subset "
                     f"of {list(allowed)} or none.")
  return names


def apply_stage1_variants(c: ml_collections.ConfigDict, variants: set[str]):
  """noperceptual: the paper's tokenizer for representation learning (VGG saw ImageNet
  labels, so a linear probe on its tokens would leak them). tiny: CPU smoke size."""
  if "noperceptual" in variants:
    c.loss.perceptual = 0.0
  if "tiny" in variants:
    c = make_tiny(c)
  return c


# ----------------------------------------------------------------------------------------------
# The public ViT-VQGAN ImageNet tokenizers of thuanz123/enhancing-transformers, described with
# our model's options (vim_jax/tools/import_enhancing.py loads their weights).
# ----------------------------------------------------------------------------------------------
ENHANCING_WEIGHTS = {  # size: (the file their README links, its Google Drive id)
    "small": ("imagenet_vitvq_small.ckpt", "1jbjD4q0iJpXrRMVSYJRIvM_94AxA1EqJ"),
    "base": ("imagenet_vitvq_base.ckpt", "1syv0t3nAJ-bETFgFpztw9cPXghanUaM6"),
}


def enhancing_stage1_config(size: str) -> ml_collections.ConfigDict:
  """Their configs/imagenet_vitvq_{size}.yaml as our stage-1 config: the Table-1 stack shapes
  with a tanh MLP, one bias-free q/k/v projection, LayerNorm eps 1e-5, fixed 2-D sin-cos
  position embeddings, no output FFNs (pre_quant / post_quant are our to_code / from_code, the
  kernel = stride = 8 conv and transposed conv are linear maps per patch), the same
  l2-normalised 8192 x 32 codebook, and a network that works on [0, 1] pixels with a plain
  linear output (no logit-Laplace). Their objective, for fine-tuning here: L2 + 0.1 LPIPS +
  0.1 adversarial + VQ. float32 compute, as they trained."""
  c = stage1_config(size, size)
  for stack in (c.model.encoder, c.model.decoder):
    stack.update(mlp_activation="tanh", qkv_bias=False, layer_norm_eps=1e-5)
  c.model.update(position_embedding="sincos", output_ffn=False, pixel_range="zero_to_one",
                 logit_laplace=False, dtype="float32")
  c.loss.update(logit_laplace=0.0)
  return c


def make_enhancing_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """make_tiny at 64 px with their patch (8) and code dimension (32): the tests' layout."""
  c = make_tiny(c)
  c.image_size = 64
  c.model.update(patch_size=8, code_dim=32, codebook_size=256)
  return c


# Paper (stage 2): blocks and widths [paper?]; heads and MLP dims unverified (we use 96-wide
# heads for Base, 64-wide for Large, MLP = 4 x width).
VIM_SIZES = {
    "base": dict(num_layers=24, width=1536, num_heads=16, head_dim=96, mlp_dim=6144),
    "large": dict(num_layers=36, width=2048, num_heads=32, head_dim=64, mlp_dim=8192),
}
PAPER_VIM_PARAMS = {"base": 650e6, "large": 1697e6}
PAPER_PROBE_BLOCK = {"base": 10, "large": 15}
# Sequences decoded at once per chip when sampling (config.sampling.batch_size): the most that
# keep ~30% of a v4 chip's 32 GiB free in the compiled sampler (Base 70%, Large 62%), from the
# TPU compiles in benchmarks/RESULTS.md ("Sampling 50k images: sizing on TPU (issue 29)").
SAMPLING_BATCH_PER_CHIP = {"base": 128, "large": 16}
# Microbatches per optimizer step (config.grad_accum_steps) by size: the fewest that leave 30%
# of a v4 chip's 32 GiB free at the paper's batch 1024 on a v4-128 (benchmarks/RESULTS.md,
# "Headroom on a v4-128"). VIM-Large at 1 needs 95% (the minimal remat policy keeps each
# layer's q, k, v and fc1 outputs for 16 sequences per chip); at 2 it halves them at no FLOP
# cost (FSDP's weight gathers and gradient reductions then run twice per step).
GRAD_ACCUM_STEPS = {"base": 1, "large": 2}


def stage2_config(size: str) -> ml_collections.ConfigDict:
  """VIM with the paper's stage-2 hyperparameters on ImageNet 256 (class-conditional)."""
  c = ml_collections.ConfigDict()
  c.trainer = "vim"
  c.seed = 0
  # The PRNG of the train step's dropout and label-dropout masks (vim_jax/infra/prng.py): auto
  # = rbg (XLA's RngBitGenerator, cheap on TPU, MaxText's choice) on TPU and threefry elsewhere;
  # or threefry, rbg, unsafe_rbg. Init keys stay threefry: a seed gives the same params on every
  # backend.
  c.dropout_rng = "auto"
  c.image_size = 256
  c.tokenizer_workdir = ""  # a stage-1 workdir (required)
  c.model = ml_collections.ConfigDict(dict(
      **VIM_SIZES[size],
      dropout=0.1,
      num_classes=1000,  # 0 = unconditional
      # The paper prepends the class token only; True also adds the class embedding to every
      # input position, so each token sees the class without attending back to it.
      condition_every_position=False,
      dtype="bfloat16",
      # Tokens per chunk of the training loss: the head's [B, chunk, codebook] float32 logits
      # exist one chunk at a time (recomputed for the gradient); must divide the token count.
      loss_chunk=256,
      **stack_kernels(remat_policy="minimal"),
  ))
  c.label_dropout = 0.1  # replace the class by the null class, for classifier-free guidance
  c.optimizer = ml_collections.ConfigDict(dict(
      b1=0.9, b2=0.96, eps=1e-8,
      peak_lr=4.5e-4, warmup_steps=5_000,  # linear warmup
      decay_start=80_000, end_lr=1e-5,  # then exponential decay to end_lr at total_steps
      weight_decay=0.0, grad_clip_norm=1.0,
  ))
  c.data = data_config()
  c.batch_size = 1024
  c.grad_accum_steps = GRAD_ACCUM_STEPS[size]  # microbatches per step (see stage1_config)
  c.total_steps = 450_000
  c.eval_batch_size = 256
  c.num_eval_images = 10_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.num_grid_images = 16  # samples drawn at each eval
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=1.0, top_k=0, top_p=1.0,  # the paper samples at temperature 1, no filtering
      guidance_scale=1.0,  # classifier-free guidance; 1 = off
      # Sequences decoded at once per chip (device): what fills its memory, since each holds a
      # KV cache (151 MB for Base, 302 MB for Large; on TPU up to 2x that as laid out). With
      # guidance each image decodes two (its class and the null class), so a batch holds half
      # as many images; the global batch is vim_step.sampling_batch_size(config, devices).
      batch_size=SAMPLING_BATCH_PER_CHIP[size],
  ))
  # gFID / IS of num_images class-balanced samples during training, against the eval split
  # (its statistics computed once per run) or fid.reference_stats; python -m vim_jax.evaluate
  # does 50k after training.
  c.fid = fid_config()
  c.fid.num_images = 10_000  # samples per evaluation
  c.fid.reference_stats = ""  # an .npz with mu/sigma; "" = the run's eval split
  c.probe = ml_collections.ConfigDict(dict(
      block=PAPER_PROBE_BLOCK[size],  # features: mean over the sequence of this block's output
      steps=5_000, batch_size=1024, lr=1e-3, weight_decay=0.0,
      num_train_images=-1, num_eval_images=-1,  # -1 = whole split
  ))
  # FSDP by default: VIM-Large's params and Adam state do not fit replicated.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  c.axis_rules = parallel.DEFAULT_AXIS_RULES
  return c


def fid_config() -> ml_collections.ConfigDict:
  """FID / IS during training (vim_jax/evaluators/fid.py); off until `every` > 0."""
  return ml_collections.ConfigDict(dict(
      every=0,  # steps between evaluations; 0 = off
      # FID InceptionV3 made by `python -m vim_jax.tools.convert_inception`; checked at start.
      inception_weights="weights/pt_inception-2015-12-05.msgpack",
      resize="bilinear",  # pytorch-fid's; see vim_jax.models.inception.RESIZE_METHODS
      batch_size=64,  # images per Inception batch (rounded to the device count)
  ))


def make_tiny_stage2(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU smoke size on the embedded data (needs a tiny tokenizer workdir)."""
  c.image_size = 32
  c.model.update(num_layers=2, width=64, num_heads=2, head_dim=32, mlp_dim=128, num_classes=6,
                 dtype="float32", remat_policy="none")
  c.data.update(source="shapes", shapes_train_size=2048, shapes_eval_size=64, num_workers=4)
  c.optimizer.update(peak_lr=1e-3, warmup_steps=0, decay_start=10)  # as make_tiny: no warmup
  c.update(batch_size=16, eval_batch_size=16, num_eval_images=32, total_steps=20, log_every=5,
           eval_every=10, checkpoint_every=10, num_grid_images=8, grad_accum_steps=1)
  c.sampling.batch_size = 8  # sequences per device: 64 images on the tests' 8 CPU devices
  c.probe.update(block=1, steps=50, batch_size=32, num_train_images=256, num_eval_images=64)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def classifier_config() -> ml_collections.ConfigDict:
  """The small conv classifier (vim_jax/trainers/classifier.py) on the embedded shapes data."""
  c = ml_collections.ConfigDict()
  c.trainer = "classifier"
  c.seed = 0
  c.image_size = 32
  c.model = ml_collections.ConfigDict(dict(widths=(16, 32, 64)))
  c.optimizer = ml_collections.ConfigDict(dict(lr=3e-3, weight_decay=1e-4))
  c.data = data_config()
  c.data.update(source="shapes", shapes_train_size=50_000, shapes_eval_size=512, num_workers=4)
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_eval_images = -1
  c.total_steps = 1000
  c.log_every = 100
  c.keep_checkpoints = 1
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  return c
