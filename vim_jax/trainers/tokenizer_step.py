"""Stage 1, the ViT-VQGAN tokenizer: its models, optimizers, train state and the pure step
functions, shared by the trainer (trainers/tokenizer.py), evaluation and the compile report.

The train step updates the tokenizer on the paper's objective (L2, logit-Laplace, LPIPS,
adversarial, VQ) and the StyleGAN discriminator in the same step; the eval step returns
per-image metrics, codes and reconstructions; `evaluate` runs it over a whole split.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vim_jax.data import pipeline, preprocess
from vim_jax.evaluators import image_metrics
from vim_jax.infra import fileio, parallel, prng
from vim_jax.models import discriminator as discriminator_lib
from vim_jax.models import lpips as lpips_lib
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.trainers import losses, microbatch, optim
from vim_jax.trainers.train_state import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizerModels:
  """The networks of the stage-1 objective; the optional ones are None when their loss is off."""

  tokenizer: tokenizer_lib.ViTVQGAN
  discriminator: discriminator_lib.StyleGANDiscriminator | None
  lpips: lpips_lib.LPIPS | None


# ----------------------------------------------------------------------------------------------
# Models, optimizers and the pure step functions.
# ----------------------------------------------------------------------------------------------
def build_models(config: ml_collections.ConfigDict) -> TokenizerModels:
  d = config.discriminator
  disc = None
  if config.loss.adversarial > 0:
    disc = discriminator_lib.StyleGANDiscriminator(
        config.image_size,
        d.channel_base,
        d.max_channels,
        d.mbstd_group_size,
        jnp.dtype(config.model.dtype),
    )
  wants_lpips = config.loss.perceptual > 0 or (fileio.exists(config.perceptual_weights))
  # LPIPS in float32 whatever the tokenizer's dtype: the loss and eval/lpips are the published
  # network's distance, not a bf16 approximation of it.
  return TokenizerModels(
      tokenizer_lib.ViTVQGAN.from_config(config),
      disc,
      lpips_lib.LPIPS(jnp.float32) if wants_lpips else None,
  )


def build_optimizers(config: ml_collections.ConfigDict):
  """(tokenizer optimizer, its schedule, discriminator optimizer)."""
  schedule = optim.warmup_cosine_schedule(config.optimizer, config.total_steps)
  d = config.discriminator
  disc_tx = optax.adam(d.lr, b1=d.b1, b2=d.b2)  # constant lr [choice]
  return optim.adamw(config.optimizer, schedule), schedule, disc_tx


def make_init_fn(models: TokenizerModels, tx, disc_tx, config, init_batch: int):
  """rng -> TrainState whose params carry logical-axis boxes (unbox after sharding)."""
  tokenizer = models.tokenizer

  def init(rng):
    rng_g, rng_d = jax.random.split(rng)
    images = jnp.zeros((init_batch, tokenizer.image_size, tokenizer.image_size, 3), jnp.float32)
    params = tokenizer.init(rng_g, images)["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if models.discriminator is not None:
      disc_params = models.discriminator.init(rng_d, images)["params"]
      state = state.replace(disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params))
      if config.discriminator.lecam_weight > 0:
        state = state.replace(lecam_ema={"real": jnp.zeros(()), "fake": jnp.zeros(())})
    if config.ema_decay > 0:
      state = state.replace(ema_params=params)
    return state

  return init


def batch_spec(config, batch_size: int, sharding) -> dict:
  """The arrays a stage-1 step takes from a batch, as ShapeDtypeStructs."""
  shape = (batch_size, config.image_size, config.image_size, 3)
  return {"image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}


# Outputs of ViTVQGAN.__call__ that the loss differentiates; the rest are indices and statistics.
DIFFERENTIABLE_OUTPUTS = ("reconstruction", "mu", "log_scale", "vq_loss")


def _image_cotangents(cotangent: dict) -> dict:
  """The cotangents of the image-shaped outputs (what the adaptive weight compares)."""
  return {k: v for k, v in cotangent.items() if k != "vq_loss"}


def r1_interval(config) -> int:
  """Steps between lazy R1 steps (StyleGAN2), 0 when the run has no R1 (no discriminator, or
  discriminator.r1_gamma = 0)."""
  d = config.discriminator
  return d.r1_interval if config.loss.adversarial > 0 and d.r1_gamma > 0 else 0


def is_r1_step(config, step: int) -> bool:
  """Whether the step that starts at `step` (the state's step before it) adds R1."""
  interval = r1_interval(config)
  return bool(interval) and step % interval == 0


def make_train_step(
    models: TokenizerModels,
    tx,
    schedule,
    disc_tx,
    config,
    data_parallel: int = 1,
    with_r1: bool = False,
) -> Callable:
  """(state, batch, lpips_params) -> (state, metrics).

  batch['image']: [B, S, S, 3] in [-1, 1]. The tokenizer and the discriminator are updated in
  the same step: G on the weighted sum of its terms (the discriminator frozen), then D on the
  real images and the (stopped) reconstructions of this step, both from this step's params.
  With config.grad_accum_steps = k, both gradients (and the metrics) are means over k
  microbatches (vim_jax/trainers/microbatch.py; data_parallel is the mesh's data x fsdp size).

  with_r1: the variant that adds the lazy R1 penalty, run when is_r1_step (every
  r1_interval steps), as StyleGAN2 separates its phases. Chosen in Python rather than by a
  lax.cond inside one program: under the gradient a cond's saved activations become outputs
  of its forward, zero-filled on every step without R1, and a cond is costed (FLOPs, MFU) at
  its costlier branch on every step.
  """
  weights = config.loss.to_dict()
  d_cfg = config.discriminator
  tokenizer, disc, lpips = models.tokenizer, models.discriminator, models.lpips
  k = config.grad_accum_steps

  def train_step(state: TrainState, batch, lpips_params):
    # The key is made where the step is traced: its implementation follows the mesh's platform.
    rng = jax.random.fold_in(prng.dropout_key(config), state.step)
    disc_active = state.step >= d_cfg.start_step  # an option delays the adversarial game

    def microbatch_gradients(micro, index):
      """The tokenizer's and the discriminator's gradients and the metrics on `micro`."""
      images = micro["image"]
      g_rng = rng if k == 1 else jax.random.fold_in(rng, index)

      def forward(params):
        """The tokenizer's differentiable outputs (images, logit-Laplace params, vq_loss) and
        the rest (indices, statistics)."""
        outputs = tokenizer.apply(
            {"params": params}, images, deterministic=False, rngs={"dropout": g_rng}
        )
        return (
            {k: v for k, v in outputs.items() if k in DIFFERENTIABLE_OUTPUTS},
            {k: v for k, v in outputs.items() if k not in DIFFERENTIABLE_OUTPUTS},
        )

      def reconstruction_loss(diff):
        terms = losses.reconstruction_terms(diff, images, tokenizer.logit_laplace_eps)
        if config.loss.perceptual > 0:
          frozen = jax.lax.stop_gradient(lpips_params)
          terms["perceptual"] = jnp.mean(
              lpips.apply({"params": frozen}, images, diff["reconstruction"])
          )
        return losses.weighted_total(terms, weights), terms

      def adversarial_loss(diff):
        fake_logits = disc.apply({"params": state.disc_params}, diff["reconstruction"])
        return losses.generator_adversarial_loss(fake_logits, d_cfg.loss)

      # The gradient is pulled back from the tokenizer's outputs explicitly, so that the
      # adversarial cotangent can be rescaled against the reconstruction one (adaptive weight)
      # without a second backward pass through the tokenizer.
      diff, pullback, aux = jax.vjp(forward, state.params, has_aux=True)
      (total, terms), cotangent = jax.value_and_grad(reconstruction_loss, has_aux=True)(diff)
      metrics = {}
      if disc is not None:
        adversarial, adv_cotangent = jax.value_and_grad(adversarial_loss)(diff)
        adv_weight = jnp.float32(weights["adversarial"])
        if d_cfg.adaptive_weight:
          adv_weight = adv_weight * losses.adaptive_adversarial_weight(
              _image_cotangents(cotangent), _image_cotangents(adv_cotangent)
          )
        adv_weight = jnp.where(disc_active, adv_weight, 0.0)  # an option delays the game
        terms["adversarial"] = jnp.where(disc_active, adversarial, 0.0)
        total = total + adv_weight * adversarial
        cotangent = jax.tree.map(lambda a, b: a + adv_weight * b, cotangent, adv_cotangent)
        metrics["adversarial_weight"] = adv_weight
      (grads,) = pullback(cotangent)
      metrics.update(
          {
              "loss": total,
              **{f"loss_{name}": value for name, value in terms.items()},
              "codebook_usage": aux["codebook_usage"],
              "perplexity": aux["perplexity"],
          }
      )
      if disc is None:
        return grads, None, metrics

      fakes = jax.lax.stop_gradient(diff["reconstruction"])
      # R1's double backward through D starts once the tokenizer's gradient exists: left free,
      # the compiler may run it while the tokenizer's activations are still held.
      r1_images = jax.lax.optimization_barrier((images, grads))[0] if with_r1 else images

      def discriminator_loss(disc_params):
        d_fn = lambda x: disc.apply({"params": disc_params}, x)
        real_logits, fake_logits = d_fn(images), d_fn(fakes)
        adversarial = losses.discriminator_loss(real_logits, fake_logits, d_cfg.loss)
        # Lazy R1 (StyleGAN2): in the R1 variant only, scaled by the interval.
        r1 = (
            losses.r1_penalty(d_fn, r1_images) * d_cfg.r1_interval
            if with_r1
            else jnp.zeros((), jnp.float32)
        )
        d_total = adversarial + 0.5 * d_cfg.r1_gamma * r1
        lecam = jnp.zeros(())
        if state.lecam_ema is not None:
          lecam = losses.lecam_regularizer(
              real_logits, fake_logits, state.lecam_ema["real"], state.lecam_ema["fake"]
          )
          d_total = d_total + d_cfg.lecam_weight * lecam
        # Window means of r1_penalty are mean R1 values: it is interval x R1 on R1 steps.
        return d_total, {
            "disc/loss_adversarial": adversarial,
            "disc/r1_penalty": r1,
            "disc/lecam": lecam,
            "disc/logits_real": jnp.mean(real_logits),
            "disc/logits_fake": jnp.mean(fake_logits),
        }

      (d_total, d_metrics), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
          state.disc_params
      )
      return grads, d_grads, {**metrics, "disc/loss": d_total, **d_metrics}

    grads, d_grads, metrics = microbatch.mean_over_microbatches(
        microbatch_gradients, batch, k, data_parallel
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics.update(
        {
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "learning_rate": schedule(state.step),
        }
    )

    if disc is not None:
      d_updates, d_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(disc_active, a, b), new, old)
      new_state = new_state.replace(
          disc_params=keep(optax.apply_updates(state.disc_params, d_updates), state.disc_params),
          disc_opt_state=keep(d_opt_state, state.disc_opt_state),
      )
      if state.lecam_ema is not None:
        decay = d_cfg.lecam_ema_decay
        new_state = new_state.replace(
            lecam_ema={
                "real": decay * state.lecam_ema["real"] + (1 - decay) * metrics["disc/logits_real"],
                "fake": decay * state.lecam_ema["fake"] + (1 - decay) * metrics["disc/logits_fake"],
            }
        )
      metrics["disc/grad_norm"] = optax.tree.norm(d_grads)

    if state.ema_params is not None:
      decay = config.ema_decay
      new_state = new_state.replace(
          ema_params=jax.tree.map(
              lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params
          )
      )
    return new_state, metrics

  return train_step


def make_train_steps(
    models: TokenizerModels, tx, schedule, disc_tx, config, data_parallel: int = 1
) -> dict[bool, Callable]:
  """The step variants a run uses, keyed by with_r1: the regular step, and the R1 step when
  the run has R1 (r1_interval > 0). The loop picks steps[is_r1_step(config, step)]."""
  variants = (False, True) if r1_interval(config) else (False,)
  return {
      with_r1: make_train_step(models, tx, schedule, disc_tx, config, data_parallel, with_r1)
      for with_r1 in variants
  }


def make_eval_step(models: TokenizerModels) -> Callable:
  """(params, batch, lpips_params) -> per-image metrics [B], indices [B, h, w],
  reconstructions."""

  def eval_step(params, batch, lpips_params):
    images = batch["image"]
    outputs = models.tokenizer.apply({"params": params}, images)
    recon = outputs["reconstruction"]
    diff = recon.astype(jnp.float32) - images
    out = {
        "psnr": image_metrics.psnr(images, recon),
        "ssim": image_metrics.ssim(images, recon),
        "l1": jnp.mean(jnp.abs(diff), axis=(1, 2, 3)),
        "l2": jnp.mean(jnp.square(diff), axis=(1, 2, 3)),
        "indices": outputs["indices"],
        "reconstruction": recon,
    }
    if models.lpips is not None:  # the reported number at full float32 precision on TPU too
      out["lpips"] = models.lpips.clone(precision="highest").apply(
          {"params": lpips_params}, images, recon
      )
    return out

  return eval_step


# ----------------------------------------------------------------------------------------------
# Evaluation over the whole held-out split.
# ----------------------------------------------------------------------------------------------
def usage_per_chunk(indices: np.ndarray, codebook_size: int, chunk: int) -> float:
  """The paper's usage: % of codes used by each `chunk` images, averaged over full chunks
  (all images as one chunk when there are fewer than `chunk`). indices: [N, h, w]."""
  n = indices.shape[0]
  starts = range(0, max(n - chunk + 1, 1), chunk)
  used = [np.unique(indices[s : s + chunk]).size / codebook_size for s in starts]
  return float(np.mean(used))


def evaluate(
    eval_fn,
    params,
    lpips_params,
    eval_pipeline: pipeline.InputPipeline,
    mesh,
    codebook_size: int,
    usage_chunk: int = 256,
    consume: Callable[[np.ndarray, np.ndarray], None] | None = None,
):
  """Runs one pass over the eval split.

  consume(images, reconstructions), both uint8 [n, S, S, 3] (padding removed), sees every
  batch: the FID evaluators use it to share this pass.
  Returns (metrics dict, (images, reconstructions) of the first batch for image grids).
  """
  sums: dict[str, float] = {}
  all_indices, first = [], None
  count = 0
  for local in eval_pipeline.iterate():
    batch = parallel.global_batch_from_local(
        {"image": local["image"], "mask": local["mask"]}, mesh, eval_pipeline.global_batch_size
    )
    out = eval_fn(params, {"image": batch["image"]}, lpips_params)
    mask = parallel.fetch(batch["mask"]).astype(bool)
    if first is None or consume is not None:  # images travel to the host only when needed
      images, recons = parallel.fetch((batch["image"], out["reconstruction"]))
      images, recons = images[mask], recons[mask]
      first = first or (images, recons)
      if consume is not None:
        consume(preprocess.to_uint8(images), preprocess.to_uint8(recons))
    per_image = [k for k in ("psnr", "ssim", "l1", "l2", "lpips") if k in out]
    out = parallel.fetch({k: out[k] for k in per_image + ["indices"]})
    for key in per_image:
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(out[key], np.float64)[mask]))
    all_indices.append(np.asarray(out["indices"])[mask])
    count += int(mask.sum())
  indices = np.concatenate(all_indices)
  counts = np.bincount(indices.reshape(-1), minlength=codebook_size)
  probs = counts / counts.sum()
  nz = probs[probs > 0]
  metrics = {k: v / count for k, v in sums.items()}
  metrics.update(
      {
          "codebook_usage": float(np.mean(counts > 0)),
          f"codebook_usage_per_{usage_chunk}": usage_per_chunk(indices, codebook_size, usage_chunk),
          "perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
          "num_images": count,
      }
  )
  return metrics, first
