"""Quickstart: the whole pipeline on the embedded shapes dataset, on 2 CPU cores, no download.

  python -m vim_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

1. stage 1: a small ViT-VQGAN tokenizer on 32x32 shapes (8x8 = 64 tokens, 512 codes)
   -> WORKDIR/tokenizer; target on the eval split: >= 24 dB PSNR, >= 80% codebook usage;
2. a small classifier on the same data -> WORKDIR/classifier (scores the samples);
3. stage 2: a class-conditional VIM on the tokenizer's tokens -> WORKDIR/vim;
4. class-conditional samples, with and without rejection sampling -> WORKDIR/samples, and
   their class accuracy as the TensorBoard scalars sample/class_accuracy and
   sample/class_accuracy_rejection (WORKDIR/samples).
Each stage resumes from its own checkpoints when rerun. `configs/quickstart.py:stage1` is the
stage-1 config alone (used by the benchmarks); `configs/quickstart.py:smoke` runs every stage
for a few steps (about a minute; tests/test_quickstart.py checks what it writes).
"""

import ml_collections

from configs import classifier, common


def simple_shapes(data: ml_collections.ConfigDict):
  """The low-entropy style of the embedded data (8 palette colours, solid backgrounds, larger
  shapes): a 1M-parameter VIM learns it in a few CPU minutes. The classifier and VIM use it;
  the tokenizer trains on the default, more varied style, which covers it."""
  data.update(
      source="shapes",
      shapes_train_size=50_000,
      shapes_eval_size=512,
      num_workers=4,
      shapes_num_colors=8,
      shapes_gradient=False,
      shapes_radius=(0.22, 0.36),
  )


def stage1_config() -> ml_collections.ConfigDict:
  """The tokenizer: the paper's stage-1 recipe (fields as in configs/vitvq_base.py) at 32 px."""
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.seed = 0
  c.dropout_rng = "auto"
  c.image_size = 32
  stack = dict(num_layers=2, width=128, num_heads=4, head_dim=32, mlp_dim=256)
  c.model = ml_collections.ConfigDict(
      dict(
          encoder=common.vit_stack(**stack),
          decoder=common.vit_stack(**stack),
          # 4-d codes: on this small, low-entropy data 8-d codes leave 80% of the codebook unused
          # (benchmarks/RESULTS.md, codebook ablation).
          patch_size=4,
          codebook_size=512,
          code_dim=4,
          l2_normalize=True,
          beta=0.25,
          logit_laplace=True,
          logit_laplace_eps=0.1,
          dtype="float32",
          position_embedding="learned",
          output_ffn=True,
          pixel_range="minus_one_to_one",
      )
  )
  for s in (c.model.encoder, c.model.decoder):
    # Unrolled: on CPU a scanned stack steps 17% slower here (benchmarks/step_time.py); scan
    # pays off in compile time, which two layers do not need.
    s.scan_layers = False
  # L2 + logit-Laplace + VQ only: the perceptual term needs converted LPIPS weights and the
  # adversarial one pays off over longer runs than a 5-minute CPU budget.
  c.loss = ml_collections.ConfigDict(
      dict(l2=1.0, logit_laplace=0.1, vq=1.0, perceptual=0.0, adversarial=0.0)
  )
  c.perceptual_weights = "weights/lpips_vgg16_v0.1.msgpack"
  c.discriminator = ml_collections.ConfigDict(
      dict(  # if turned on
          channel_base=64 * 32,
          max_channels=256,
          mbstd_group_size=4,
          loss="non_saturating",
          r1_gamma=10.0,
          r1_interval=16,
          lecam_weight=0.0,
          lecam_ema_decay=0.99,
          start_step=0,
          adaptive_weight=False,
          lr=1e-4,
          b1=0.9,
          b2=0.99,
      )
  )
  c.ema_decay = 0.0
  c.optimizer = ml_collections.ConfigDict(
      dict(
          b1=0.9,
          b2=0.99,
          eps=1e-8,
          peak_lr=2e-3,
          warmup_steps=100,
          end_lr=1e-4,
          weight_decay=1e-4,
          grad_clip_norm=1.0,
      )
  )
  c.data = common.data_config(
      source="shapes", shapes_train_size=50_000, shapes_eval_size=512, num_workers=4
  )
  c.update(
      batch_size=32,
      grad_accum_steps=1,
      total_steps=1400,
      eval_batch_size=64,
      num_eval_images=-1,
      eval_usage_chunk=256,
      log_every=100,
      eval_every=500,
      checkpoint_every=500,
      keep_checkpoints=3,
      num_grid_images=16,
  )
  c.fid = common.fid_config()
  c.mesh = common.mesh_config(data=-1, fsdp=1)
  c.axis_rules = common.AXIS_RULES
  return c


def stage2_config() -> ml_collections.ConfigDict:
  """A small class-conditional VIM: the paper's stage-2 recipe (fields as in
  configs/vim_base.py), shortened."""
  c = ml_collections.ConfigDict()
  c.trainer = "vim"
  c.seed = 0
  c.dropout_rng = "auto"
  c.image_size = 32
  c.tokenizer_workdir = ""  # the quickstart sets its own stage 1's
  c.model = ml_collections.ConfigDict(
      dict(
          num_layers=4,
          width=128,
          num_heads=4,
          head_dim=32,
          mlp_dim=512,
          dropout=0.0,
          num_classes=6,
          # The class embedding is also added at every position (not in the paper): this small,
          # briefly trained model then uses the class far more (samples 52.5% -> 61.2% class
          # accuracy at guidance 2; benchmarks/RESULTS.md).
          condition_every_position=True,
          dtype="float32",
          loss_chunk=256,
          **common.block_options(),
          **common.stack_kernels(remat_policy="none"),
      )
  )
  c.model.scan_layers = False  # 30% faster steps on CPU than scanned (as stage 1)
  c.label_dropout = 0.1
  c.optimizer = ml_collections.ConfigDict(
      dict(
          b1=0.9,
          b2=0.96,
          eps=1e-8,
          peak_lr=1.5e-3,
          warmup_steps=100,
          decay_start=700,
          end_lr=1e-4,
          weight_decay=0.0,
          grad_clip_norm=1.0,
      )
  )
  c.data = common.data_config()
  simple_shapes(c.data)
  c.update(
      batch_size=64,
      grad_accum_steps=1,
      total_steps=1400,
      eval_batch_size=64,
      num_eval_images=256,
      log_every=100,
      eval_every=750,
      checkpoint_every=750,
      keep_checkpoints=3,
      num_grid_images=12,
  )
  c.sampling = ml_collections.ConfigDict(
      dict(
          temperature=1.0,
          top_k=0,
          top_p=1.0,
          # Classifier-free guidance (not in the paper) makes a model this small and briefly
          # trained stick to its class (2 scores best of 1.5-3); --config.stage2.sampling.
          # guidance_scale=1 samples without it.
          guidance_scale=2.0,
          batch_size=128,  # sequences decoded at once per device
      )
  )
  c.fid = common.fid_config(num_images=10_000, reference_stats="")
  c.probe = ml_collections.ConfigDict(
      dict(
          block=2,
          steps=500,
          batch_size=256,
          lr=1e-2,
          weight_decay=0.0,
          num_train_images=4096,
          num_eval_images=512,
      )
  )
  c.mesh = common.mesh_config(data=-1, fsdp=1)
  c.axis_rules = common.AXIS_RULES
  return c


def make_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every stage of the pipeline at its real model sizes, for a few steps and on a few eval
  images: the whole path (checkpoints, logs, grids, samples, scores) in about a minute."""
  for stage in (c.stage1, c.classifier, c.stage2):
    stage.update(total_steps=6, log_every=3, num_eval_images=64)
  for stage in (c.stage1, c.stage2):
    stage.update(eval_every=6, checkpoint_every=3)
  c.num_samples = 12
  return c


def get_config(arg=None):
  variants = common.parse_variant(arg, allowed=("stage1", "smoke"))
  if "stage1" in variants:
    return stage1_config()
  c = ml_collections.ConfigDict()
  c.trainer = "quickstart"
  c.stage1 = stage1_config()
  c.classifier = classifier.get_config()
  c.classifier.total_steps = 700
  simple_shapes(c.classifier.data)
  c.stage2 = stage2_config()
  c.num_samples = 120  # class-balanced
  c.acceptance = 0.5  # rejection sampling keeps the best half (paper's rate)
  c.sample_seed = 0
  return make_smoke(c) if "smoke" in variants else c
