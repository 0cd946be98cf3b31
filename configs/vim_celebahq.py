"""VIM-Base on CelebA-HQ 256x256: unconditional generation on configs/vitvq_celebahq.py's tokenizer.

  python -m vim_jax.main --config=configs/vim_celebahq.py --workdir=$WORKDIR \
      --config.tokenizer_workdir=$STAGE1_WORKDIR
  python -m vim_jax.main --config=configs/vim_celebahq.py:tiny --workdir=/tmp/vim_celebahq_tiny \
      --config.tokenizer_workdir=/tmp/celebahq_tiny  # CPU smoke, on a :tiny stage-1 run

Paper: unconditional FID 7.0 on CelebA-HQ (secondary summaries, [paper?] in vim_jax/paper.py);
the paper does not say which VIM size or schedule: VIM-Base with the ImageNet recipe
(configs/vim_base.py, whose comments document every field) is our choice, without classes
(num_classes=0, no label dropout).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  variants = common.parse_variant(arg, allowed=("tiny",))
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
  c.model = ml_collections.ConfigDict(
      dict(
          # The paper's blocks and width; 96-wide heads and MLP = 4 x width are ours (unpublished).
          num_layers=24,
          width=1536,
          num_heads=16,
          head_dim=96,
          mlp_dim=6144,
          dropout=0.1,
          num_classes=0,  # unconditional
          # The paper prepends the class token only; True also adds the class embedding to every
          # input position, so each token sees the class without attending back to it.
          condition_every_position=False,
          dtype="bfloat16",
          # Tokens per chunk of the training loss: the head's [B, chunk, codebook] float32 logits
          # exist one chunk at a time (recomputed for the gradient); must divide the token count.
          loss_chunk=256,
          **common.block_options(),
          **common.stack_kernels(remat_policy="minimal"),
      )
  )
  c.label_dropout = 0.0  # no classes to drop
  c.optimizer = ml_collections.ConfigDict(
      dict(
          b1=0.9,
          b2=0.96,
          eps=1e-8,
          peak_lr=4.5e-4,
          warmup_steps=5_000,  # linear warmup
          decay_start=80_000,
          end_lr=1e-5,  # then exponential decay to end_lr at total_steps
          weight_decay=0.0,
          grad_clip_norm=1.0,
      )
  )
  # CelebA-HQ 256 from tfds (prepared by hand, README "CelebA-HQ and FFHQ"): its one split of
  # 30k images, cut 25k / 5k as taming-transformers' VQGAN does (their lists pick by CelebA
  # index; tfds' fixed order picks another 25k / 5k). No labels.
  c.data = common.data_config(
      name="celeb_a_hq/256", train_split="train[:25000]", eval_split="train[25000:]", label_key=""
  )
  c.batch_size = 1024
  # Microbatches per optimizer step (gradient accumulation, as in configs/vitvq_base.py): the
  # fewest that leave 30% of a v4 chip's 32 GiB free at batch 1024 on a v4-128
  # (benchmarks/RESULTS.md, "Headroom on a v4-128").
  c.grad_accum_steps = 1
  c.total_steps = 450_000
  c.eval_batch_size = 256
  c.num_eval_images = 10_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.num_grid_images = 16  # samples drawn at each eval
  c.sampling = ml_collections.ConfigDict(
      dict(
          temperature=1.0,
          top_k=0,
          top_p=1.0,  # the paper samples at temperature 1, no filtering
          guidance_scale=1.0,  # classifier-free guidance; 1 = off
          # Sequences decoded at once per chip (device): what fills its memory, since each holds a
          # KV cache (151 MB for Base, 302 MB for Large; on TPU up to 2x that as laid out). With
          # guidance each image decodes two (its class and the null class), so a batch holds half
          # as many images; the global batch is vim_step.sampling_batch_size(config, devices).
          # 128: the most that keep ~30% of a v4 chip's 32 GiB free in the compiled sampler
          # (benchmarks/RESULTS.md, "Sampling 50k images: sizing on TPU").
          batch_size=128,
      )
  )
  # gFID / IS of num_images samples during training, against the eval split
  # (its statistics computed once per run) or fid.reference_stats; python -m vim_jax.evaluate
  # does 50k after training.
  c.fid = common.fid_config(
      num_images=10_000,  # samples per evaluation
      reference_stats="",  # an .npz with mu/sigma; "" = the run's eval split
  )
  c.probe = ml_collections.ConfigDict(
      dict(
          block=10,  # the paper's; features: mean over the sequence of this block's output
          steps=5_000,
          batch_size=1024,
          lr=1e-3,
          weight_decay=0.0,
          num_train_images=-1,
          num_eval_images=-1,  # -1 = whole split
      )
  )
  # FSDP by default: VIM-Large's params and Adam state do not fit replicated.
  c.mesh = common.mesh_config(data=1, fsdp=-1)
  c.axis_rules = common.AXIS_RULES
  if "tiny" in variants:
    c = common.make_tiny_stage2(c)
    c.model.num_classes = 0
  return c
