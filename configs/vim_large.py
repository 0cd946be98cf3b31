"""VIM-Large: class-conditional ImageNet 256 generation on a ViT-VQGAN tokenizer (stage 2).

  python -m vim_jax.main --config=configs/vim_large.py --workdir=$WORKDIR \
      --config.tokenizer_workdir=$STAGE1_WORKDIR --config.mesh.fsdp=-1 --config.mesh.tensor=4
  python -m vim_jax.main --config=configs/vim_large.py:tiny --workdir=/tmp/vim_tiny \
      --config.tokenizer_workdir=/tmp/bb_tiny  # CPU smoke

Paper: 36 blocks, width 2048 (1697M params). With ViT-VQGAN SL: FID 4.17 / IS 175.1 on
ImageNet 256 class-conditional; 3.04 / 227.4 with ResNet-101 rejection sampling at acceptance
0.5. Linear probe: block 15 of 36, 73.2% ImageNet top-1 (unconditional model). Optimizer and
schedule as VIM-Base; fields as documented in configs/vim_base.py.
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
          # The paper's blocks and width; 64-wide heads and MLP = 4 x width are ours (unpublished).
          num_layers=36,
          width=2048,
          num_heads=32,
          head_dim=64,
          mlp_dim=8192,
          dropout=0.1,
          num_classes=1000,  # 0 = unconditional
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
  c.label_dropout = 0.1  # replace the class by the null class, for classifier-free guidance
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
  c.data = common.data_config(name="imagenet2012", train_split="train", eval_split="validation")
  c.batch_size = 1024
  # Microbatches per optimizer step: the fewest that leave 30% of a v4 chip's 32 GiB free at
  # batch 1024 on a v4-128 (benchmarks/RESULTS.md, "Headroom on a v4-128"). At 1 it needs 95%
  # (the minimal remat policy keeps each layer's q, k, v and fc1 outputs for 16 sequences per
  # chip); 2 halves them at no FLOP cost (FSDP's weight gathers and gradient reductions then
  # run twice per step).
  c.grad_accum_steps = 2
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
          # Sequences decoded at once per chip (each holds a 302 MB KV cache): the most that keep
          # ~30% of a v4 chip's 32 GiB free in the compiled sampler (benchmarks/RESULTS.md,
          # "Sampling 50k images: sizing on TPU").
          batch_size=16,
      )
  )
  # gFID / IS of num_images class-balanced samples during training, against the eval split
  # (its statistics computed once per run) or fid.reference_stats; python -m vim_jax.evaluate
  # does 50k after training.
  c.fid = common.fid_config(
      num_images=10_000,  # samples per evaluation
      reference_stats="",  # an .npz with mu/sigma; "" = the run's eval split
  )
  c.probe = ml_collections.ConfigDict(
      dict(
          block=15,  # the paper's; features: mean over the sequence of this block's output
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
  return common.make_tiny_stage2(c) if "tiny" in variants else c
