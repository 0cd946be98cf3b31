"""ViT-VQGAN Base-Base on FFHQ 256x256: the paper's tokenizer for unconditional FFHQ.

  python -m vim_jax.main --config=configs/vitvq_ffhq.py --workdir=$WORKDIR \
      --config.data.folder=/data/ffhq --config.data.folder_eval_list=ffhqvalidation.txt
  python -m vim_jax.main --config=configs/vitvq_ffhq.py:tiny --workdir=/tmp/ffhq_tiny  # CPU smoke

Paper: rFID 3.13 on FFHQ (secondary summaries, [paper?] in vim_jax/paper.py); the paper does not
say which stage-1 size or schedule it used there: Base-Base and the ImageNet recipe
(configs/vitvq_base.py, whose comments document every field) are our choice. Stage 2:
configs/vim_ffhq.py.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  variants = common.parse_variant(arg, allowed=("tiny",))
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.seed = 0
  # The PRNG of the train step's dropout masks (vim_jax/infra/prng.py): auto = rbg (XLA's
  # RngBitGenerator, cheap on TPU, MaxText's choice) on TPU and threefry elsewhere; or threefry,
  # rbg, unsafe_rbg. Init keys stay threefry: a seed gives the same params on every backend.
  c.dropout_rng = "auto"
  c.image_size = 256

  c.model = ml_collections.ConfigDict(
      dict(
          # Table 1's Base, encoder and decoder.
          encoder=common.vit_stack(
              num_layers=12, width=768, num_heads=12, head_dim=64, mlp_dim=3072
          ),
          decoder=common.vit_stack(
              num_layers=12, width=768, num_heads=12, head_dim=64, mlp_dim=3072
          ),
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
      )
  )
  # Weights of each loss term: L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-Laplace
  # + 1.0 L_2 (paper). A weight of 0 removes the term and, for perceptual/adversarial, its
  # network.
  c.loss = ml_collections.ConfigDict(
      dict(l2=1.0, logit_laplace=0.1, vq=1.0, perceptual=0.1, adversarial=0.1)
  )
  # LPIPS (VGG16, v0.1) Flax weights made by `python -m vim_jax.tools.convert_lpips`. Needed when
  # loss.perceptual > 0; when the file exists, eval also reports eval/lpips.
  c.perceptual_weights = "weights/lpips_vgg16_v0.1.msgpack"
  # StyleGAN2 discriminator, trained in the same step as the tokenizer from start_step on.
  c.discriminator = ml_collections.ConfigDict(
      dict(
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
          lr=1e-4,
          b1=0.9,
          b2=0.99,  # Adam, constant lr
      )
  )
  c.ema_decay = 0.0  # EMA of the tokenizer's params for eval (e.g. 0.999); 0 = off
  c.optimizer = ml_collections.ConfigDict(
      dict(
          b1=0.9,
          b2=0.99,
          eps=1e-8,
          peak_lr=1e-4,
          warmup_steps=50_000,
          end_lr=5e-5,  # linear warmup, cosine to end_lr
          weight_decay=1e-4,  # decoupled, on matrices only
          grad_clip_norm=1.0,  # [choice]; 0 disables
      )
  )
  # FFHQ from a folder of its 70k images (README "CelebA-HQ and FFHQ"), split as
  # taming-transformers' VQGAN does: the 10k files their data/ffhqvalidation.txt names are the
  # eval split, the other 60k train. Set both paths.
  # folder_eval_fraction 0: no split by path hash; a run without the list stops at start.
  c.data = common.data_config(
      source="folder", folder="", folder_eval_list="", folder_eval_fraction=0.0
  )

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
  c.fid = common.fid_config()

  c.mesh = common.mesh_config(data=-1, fsdp=1)  # data parallel: the params fit replicated
  c.axis_rules = common.AXIS_RULES
  return common.apply_stage1_variants(c, variants)
