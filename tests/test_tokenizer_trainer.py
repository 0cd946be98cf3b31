"""Stage-1 trainer: 1 vs 8 devices, exact resume, NaN guard, evaluation helpers."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_compare import assert_leaves_close, assert_same_metrics, assert_states_close
from run_files import eval_images

from vim_jax.trainers import tokenizer as tokenizer_trainer
from vim_jax.trainers import tokenizer_step


def _short(config, steps=2):
  config.update(
      total_steps=steps, log_every=1, eval_every=1000, checkpoint_every=1000, num_eval_images=16
  )
  return config


def _max_param_diff(a, b):
  pa, pb = tokenizer_trainer.summarize_for_tests(a.state), tokenizer_trainer.summarize_for_tests(
      b.state
  )
  assert pa.keys() == pb.keys()
  return max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  """The 1-device reference both mesh cases compare against (trained once)."""
  from configs import vitvq_base

  config = _short(vitvq_base.get_config("tiny"), steps=3)
  return tokenizer_trainer.train_and_evaluate(
      config, str(tmp_path_factory.mktemp("one")), devices=jax.devices()[:1]
  )


@pytest.mark.parametrize(
    "mesh",
    [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)],
    ids=["data8", "data2_fsdp2_tensor2"],
)
def test_eight_devices_match_one(one_device_run, tiny_config, tmp_path, mesh):
  """Losses and gradient norms at every step, and every array of the final state (both Adam
  states included) equal the 1-device run's. With no warmup, steps 2 and 3 start from params
  that earlier steps moved."""
  config = _short(tiny_config, steps=3)
  config.mesh.update(**mesh)
  eight = tokenizer_trainer.train_and_evaluate(config, str(tmp_path / "eight"))
  one = one_device_run
  assert len(jax.tree.leaves(eight.state.params)[0].sharding.device_set) == 8
  assert_same_metrics(
      one.train_metrics,
      eight.train_metrics,
      keys=("loss", "grad_norm", "disc/loss", "disc/grad_norm"),
  )
  assert_states_close(one.state, eight.state, param_atol=config.optimizer.peak_lr)
  if mesh["tensor"] == 2:  # the layout is really sharded, not replicated
    kernel = eight.state.params["encoder"]["transformer"]["layers"]["block"]["mlp"]["fc1"][
        "kernel"
    ]  # [layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (
        kernel.shape[0],
        kernel.shape[1] // 2,
        kernel.shape[2] // 2,
    )


def test_paper_precision_bf16_and_remat_trains_close_to_float32(
    one_device_run, tiny_config, tmp_path
):
  """The paper configs' settings (bfloat16 compute, rematerialised blocks) compile and train at
  tiny size: params stay float32, and the first step's loss and gradient norm (same initial
  params) are within bfloat16's precision of the float32 run's."""
  config = _short(tiny_config, steps=3)
  config.model.dtype = "bfloat16"
  config.model.encoder.remat_policy = config.model.decoder.remat_policy = "full"
  run = tokenizer_trainer.train_and_evaluate(
      config, str(tmp_path / "bf16"), devices=jax.devices()[:1]
  )
  assert {leaf.dtype for leaf in jax.tree.leaves(run.state.params)} == {np.dtype("float32")}
  first, reference = run.train_metrics[0], one_device_run.train_metrics[0]
  # As test_vim_trainer's bf16 test argues (u = 2^-8, bf16's unit roundoff): the tiny
  # tokenizer's deepest path (patch embedding, 2 + 2 blocks of about 11 rounded ops, the head)
  # has some k = 48 roundings, which compound as a random walk to u sqrt(k / 3) = 4u on a pixel
  # of the reconstruction or a cotangent. The losses are means over 16 x 32 x 32 x 3 pixels
  # (the discriminator's over 16 logits of the same images) in which that independent part
  # averages away; what stays is the part every pixel shares (a weight or a normalisation
  # statistic rounded once), one rounding: within u of the loss. A gradient entry multiplies a
  # cotangent and an activation, each 4u off, and its sum over pixels keeps the shared part:
  # 4u on the norm. (Measured: loss 8e-4, grad_norm 1.4e-3, disc/loss 1.4e-4.) These are
  # estimates of what rounding explains, not worst-case bounds: a bf16-only error of 1% in the
  # losses or 2% in the gradients fails.
  u = 2.0**-8
  for key, rel in (("loss", u), ("grad_norm", 4 * u), ("disc/loss", u)):
    assert first[key] == pytest.approx(reference[key], rel=rel), key
  assert all(math.isfinite(m["loss"]) for m in run.train_metrics)


def _eval_psnr(config, params) -> float:
  """Mean PSNR (data range 1) of the eval images' reconstructions by `params`, in numpy."""
  images = eval_images(config)
  tokenizer = tokenizer_step.build_models(config).tokenizer
  recon = np.asarray(tokenizer.apply({"params": params}, images)["reconstruction"], np.float64)
  mse = np.mean(((recon - images) / 2) ** 2, axis=(1, 2, 3))
  return float(np.mean(-10 * np.log10(mse)))


def _damage(checkpoint_dir):
  """Overwrites a checkpoint's data files, as a bad disk would."""
  import glob

  paths = glob.glob(os.path.join(checkpoint_dir, "**", "d", "*"), recursive=True)
  assert paths, checkpoint_dir
  for path in paths:
    with open(path, "wb") as f:
      f.write(b"garbage")


def test_resume_is_exact_keeps_n_and_survives_corrupt_checkpoints(
    lpips_files, tiny_config, tmp_path, caplog
):
  """Every loss term on (LPIPS, GAN with LeCam, generator EMA), so every checkpointed field is
  exercised. Straight vs interrupted-and-resumed, then the latest checkpoint damaged (falls
  back to the previous one and still ends equal), then all damaged (refuses to restart)."""
  from vim_jax.infra import checkpoint

  config = _short(tiny_config, steps=4)
  # Batch 8: LPIPS's VGG16 is most of a step's cost.
  config.update(
      ema_decay=0.9,
      checkpoint_every=1,
      keep_checkpoints=2,
      batch_size=8,
      eval_batch_size=8,
      num_eval_images=8,
      perceptual_weights=lpips_files["flax"],
  )
  config.loss.perceptual = 0.1
  config.discriminator.lecam_weight = 0.1
  straight_dir, run_dir = str(tmp_path / "straight"), str(tmp_path / "run")
  # One device: resuming does not depend on the layout (the 8-device run's checkpoints are
  # resumed by the preemption and multi-host tests), and 8 virtual devices on 2 cores are slow.
  one = jax.devices()[:1]
  straight = tokenizer_trainer.train_and_evaluate(config, straight_dir, devices=one)
  assert sorted(os.listdir(os.path.join(straight_dir, "checkpoints"))) == ["3", "4"]  # keep 2

  first = tokenizer_trainer.train_and_evaluate(
      config, run_dir, should_stop=lambda s: s == 2, devices=one
  )
  assert int(first.state.step) == 2
  resumed = tokenizer_trainer.train_and_evaluate(config, run_dir, devices=one)
  assert [m["step"] for m in resumed.train_metrics] == [3, 4]
  assert resumed.train_metrics[-1]["loss_perceptual"] > 0
  untimed = lambda m: {k: v for k, v in m.items() if "per_sec" not in k}
  assert [untimed(m) for m in resumed.train_metrics] == [
      untimed(m) for m in straight.train_metrics[2:]
  ]  # every logged scalar, bit for bit
  assert_states_close(straight.state, resumed.state, rel=0.0)
  # The final eval scored the EMA params, not the trained ones.
  ema_psnr = _eval_psnr(config, resumed.state.ema_params)
  assert resumed.eval_metrics["psnr"] == pytest.approx(ema_psnr, rel=1e-5)
  assert abs(_eval_psnr(config, resumed.state.params) - ema_psnr) > 1e-3

  # A damaged latest checkpoint is set aside; the run resumes from step 3 and redoes step 4.
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  _damage(os.path.join(ckpt_dir, "4"))
  caplog.set_level("WARNING")
  again = tokenizer_trainer.train_and_evaluate(config, run_dir, devices=one)
  assert "step 4" in caplog.text and "corrupt or partial" in caplog.text
  assert os.path.isdir(os.path.join(ckpt_dir, "corrupt", "4"))
  assert [m["step"] for m in again.train_metrics] == [4]
  assert_states_close(straight.state, again.state, rel=0.0)

  # Nothing restores: the run refuses to start over, naming the folder, every time it is run.
  for step in ("3", "4"):
    _damage(os.path.join(ckpt_dir, step))
  for _ in range(2):
    with pytest.raises(checkpoint.NoUsableCheckpointError, match=f"{ckpt_dir}.*Refusing"):
      tokenizer_trainer.train_and_evaluate(config, run_dir, devices=one)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  config = _short(tiny_config, steps=6)
  config.loss.adversarial = (
      0.0  # the guard reads the loss, whatever its terms; a GAN costs compiles
  )
  config.update(checkpoint_every=2, log_every=2)
  workdir = str(tmp_path / "nan")
  one = jax.devices()[:1]
  tokenizer_trainer.train_and_evaluate(config, workdir, should_stop=lambda s: s == 2, devices=one)
  config.optimizer.peak_lr = 1e30  # blows the parameters up on the next steps
  with pytest.raises(FloatingPointError, match=r"at step 4.*last good checkpoint is step 2"):
    tokenizer_trainer.train_and_evaluate(config, workdir, devices=one)
  from vim_jax.infra import checkpoint

  assert checkpoint.Checkpointer(workdir + "/checkpoints").latest_step() == 2


def test_evaluation_reports_every_metric(tiny_config, tmp_path):
  """Each eval metric equals its definition computed here in numpy from the final params, over
  exactly the 20 eval images (the padded last batch of 8 is masked out)."""
  from vim_jax.models import tokenizer as tokenizer_lib

  config = _short(tiny_config, steps=2)
  config.loss.adversarial = 0.0  # evaluation scores the tokenizer alone
  config.update(eval_every=2, num_eval_images=20, eval_batch_size=8, eval_usage_chunk=8)
  result = tokenizer_trainer.train_and_evaluate(
      config, str(tmp_path / "eval"), devices=jax.devices()[:1]
  )
  m = result.eval_metrics
  assert m["num_images"] == 20
  images = eval_images(config)
  assert len(images) == 20
  tokenizer = tokenizer_step.build_models(config).tokenizer
  params = result.state.params
  recon = np.asarray(tokenizer.apply({"params": params}, images)["reconstruction"], np.float64)
  indices = np.asarray(
      tokenizer.apply({"params": params}, images, method=tokenizer_lib.ViTVQGAN.encode_to_indices)
  )
  diff = recon - images
  counts = np.bincount(indices.ravel(), minlength=256) / indices.size
  nz = counts[counts > 0]
  chunks = [np.unique(indices[s : s + 8]).size / 256 for s in range(0, 20, 8)]
  expected = {
      "l1": np.mean(np.abs(diff)),
      "l2": np.mean(diff**2),
      "psnr": np.mean(-10 * np.log10(np.mean((diff / 2) ** 2, axis=(1, 2, 3)))),
      "codebook_usage": np.unique(indices).size / 256,
      "perplexity": np.exp(-np.sum(nz * np.log(nz))),
      "codebook_usage_per_8": np.mean(chunks[:2]),  # full chunks only: 16 of the 20 images
  }
  for key, value in expected.items():
    assert m[key] == pytest.approx(value, rel=1e-4), key
  import tensorflow as tf

  ssim = tf.image.ssim(
      tf.constant((images + 1) / 2, tf.float32),
      tf.constant((recon + 1) / 2, tf.float32),
      max_val=1.0,
      filter_size=11,
      filter_sigma=1.5,
      k1=0.01,
      k2=0.03,
  ).numpy()
  assert m["ssim"] == pytest.approx(float(np.mean(ssim)), rel=1e-3, abs=1e-4)


def test_usage_per_chunk_matches_definition():
  rng = np.random.default_rng(0)
  indices = rng.integers(0, 50, size=(10, 2, 2))
  expected = np.mean([np.unique(indices[s : s + 4]).size / 100 for s in (0, 4)])
  assert tokenizer_step.usage_per_chunk(indices, 100, 4) == pytest.approx(expected)
  assert tokenizer_step.usage_per_chunk(indices[:3], 100, 4) == pytest.approx(
      np.unique(indices[:3]).size / 100
  )


def _changed(a, b):
  return any(
      not np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


IMAGES = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)


def _steps(config, num_steps):
  """[initial state, state after each step], [metrics of each step], on IMAGES every step,
  built with the trainer's functions."""
  import flax.linen as nn

  models = tokenizer_step.build_models(config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(config)
  init = tokenizer_step.make_init_fn(models, tx, disc_tx, config, init_batch=1)
  states = [nn.meta.unbox(jax.jit(init)(jax.random.key(0)))]
  steps = {
      r1: jax.jit(fn)
      for r1, fn in tokenizer_step.make_train_steps(models, tx, schedule, disc_tx, config).items()
  }
  all_metrics = []
  for i in range(num_steps):
    state, metrics = steps[tokenizer_step.is_r1_step(config, i)](states[-1], {"image": IMAGES}, {})
    states.append(state)
    all_metrics.append(metrics)
  return states, all_metrics


def _one_step(config):
  """Initial state, the state after one train step, and its metrics."""
  (state, new_state), (metrics,) = _steps(config, 1)
  return state, new_state, metrics


def test_lazy_r1_runs_on_its_interval_only(tiny_config):
  """R1 on steps 0 and 2 with r1_interval=2, scaled by the interval: interval x the mean over
  the batch of ||d sum(D(x)) / d x_i||^2 at the step's discriminator; zero between."""
  from vim_jax.trainers import losses

  tiny_config.discriminator.r1_interval = 2
  states, metrics = _steps(tiny_config, 3)
  disc = tokenizer_step.build_models(tiny_config).discriminator
  input_grad = jax.jit(jax.grad(lambda p, x: disc.apply({"params": p}, x).sum(), argnums=1))
  logits = jax.jit(lambda p, x: disc.apply({"params": p}, x))
  for step in range(3):
    d_params = states[step].disc_params
    grads = np.asarray(input_grad(d_params, IMAGES), np.float64)
    expected = 2 * np.mean(np.sum(grads**2, axis=(1, 2, 3))) if step % 2 == 0 else 0.0
    assert float(metrics[step]["disc/r1_penalty"]) == pytest.approx(expected, rel=1e-4), step
    fakes = _reconstruct(tiny_config, states[step].params, step)
    gan = losses.discriminator_loss(
        logits(d_params, IMAGES), logits(d_params, fakes), tiny_config.discriminator.loss
    )
    assert float(metrics[step]["disc/loss"]) == pytest.approx(
        float(gan) + 0.5 * tiny_config.discriminator.r1_gamma * expected, rel=1e-4
    ), step


def _reconstruct(config, params, step):
  """The train step's reconstruction of IMAGES at `step` (same dropout key)."""
  tokenizer = tokenizer_step.build_models(config).tokenizer
  rng = jax.random.fold_in(jax.random.key(config.seed), step)
  return jax.jit(
      lambda p: tokenizer.apply({"params": p}, IMAGES, deterministic=False, rngs={"dropout": rng})[
          "reconstruction"
      ]
  )(params)


def test_two_steps_update_generator_discriminator_ema_and_lecam(tiny_config):
  """Two train steps with a generator EMA at decay 0.9 and LeCam on, against float64 numpy
  from the saved states (the discriminator's logits recomputed here at each step's params):
  - the EMA is d e + (1 - d) p after each step: 0.9 p0 + 0.1 p1, then 0.81 p0 + 0.09 p1 +
    0.1 p2 (at the former test's d = 0.5, (1 - d) e + d p gave the same values);
  - the LeCam averages follow their own logits: real from D(x), fake from D(G(z));
  - the discriminator's loss adds + lecam_weight x (mean (D(x) - ema_fake)^2 +
    mean (D(G(z)) - ema_real)^2) at the averages before the step (step 1 has no R1, step 0's
    comes from the lazy R1 test's metric)."""
  tiny_config.update(ema_decay=0.9)
  d_cfg = tiny_config.discriminator
  d_cfg.lecam_weight = 0.1
  assert d_cfg.r1_interval > 1 and d_cfg.lecam_ema_decay == 0.99
  states, metrics = _steps(tiny_config, 2)
  for before, after in zip(states, states[1:]):
    assert _changed(before.params, after.params)
    assert _changed(before.disc_params, after.disc_params)
  assert float(metrics[0]["disc/r1_penalty"]) > 0  # step 0 is an R1 step
  assert float(metrics[1]["disc/r1_penalty"]) == 0

  params = [jax.tree.map(lambda x: np.asarray(x, np.float64), s.params) for s in states]
  expected_ema = {
      1: jax.tree.map(lambda p0, p1: 0.9 * p0 + 0.1 * p1, *params[:2]),
      2: jax.tree.map(lambda p0, p1, p2: 0.81 * p0 + 0.09 * p1 + 0.1 * p2, *params),
  }
  for step, expected in expected_ema.items():
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(states[step].ema_params)):
      np.testing.assert_allclose(np.asarray(b), a, rtol=1e-6, atol=1e-7)

  disc = tokenizer_step.build_models(tiny_config).discriminator
  logits = jax.jit(lambda p, x: disc.apply({"params": p}, x))
  softplus = lambda x: np.logaddexp(0.0, x)
  decay, ema = d_cfg.lecam_ema_decay, {"real": 0.0, "fake": 0.0}
  for step in range(2):
    d_params = states[step].disc_params
    real = np.asarray(logits(d_params, IMAGES), np.float64)
    fake = np.asarray(
        logits(d_params, _reconstruct(tiny_config, states[step].params, step)), np.float64
    )
    lecam = np.mean((real - ema["fake"]) ** 2) + np.mean((fake - ema["real"]) ** 2)
    m = metrics[step]
    assert float(m["disc/lecam"]) == pytest.approx(lecam, rel=1e-4), step
    r1 = 0.5 * d_cfg.r1_gamma * float(m["disc/r1_penalty"])
    expected_loss = np.mean(softplus(-real)) + np.mean(softplus(fake)) + r1 + 0.1 * lecam
    assert float(m["disc/loss"]) == pytest.approx(expected_loss, rel=1e-5), step
    ema = {
        "real": decay * ema["real"] + (1 - decay) * np.mean(real),
        "fake": decay * ema["fake"] + (1 - decay) * np.mean(fake),
    }
    for key in ("real", "fake"):
      assert float(states[step + 1].lecam_ema[key]) == pytest.approx(ema[key], rel=1e-5), (
          step,
          key,
      )
  print(f"\nLeCam at step 1: {lecam:.4f} (x 0.1 in a loss of {expected_loss:.4f}); averages {ema}")


def test_discriminator_start_step_delays_the_game(tiny_config):
  tiny_config.discriminator.start_step = 5
  state, new, metrics = _one_step(tiny_config)
  assert not _changed(state.disc_params, new.disc_params)
  assert not _changed(state.disc_opt_state, new.disc_opt_state)
  assert float(metrics["loss_adversarial"]) == 0.0
  assert _changed(state.params, new.params)


def test_gan_off_builds_no_discriminator(tiny_config):
  tiny_config.loss.adversarial = 0.0
  state, new, metrics = _one_step(tiny_config)
  assert new.disc_params is None and "disc/loss" not in metrics
  assert "loss_adversarial" not in metrics


def _independent_generator_loss(config, state, images, adversarial_weight):
  """The generator's weighted objective written out here from its definitions, not through
  losses.reconstruction_terms / weighted_total: L2, the logit-Laplace NLL
  |logit(x) - mu| / b + log(2 b x (1 - x)) on x squashed to [eps, 1 - eps], the quantizer's
  loss, and the non-saturating softplus(-D(G)) term."""
  assert config.discriminator.loss == "non_saturating" and config.loss.perceptual == 0
  models = tokenizer_step.build_models(config)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  eps, w = models.tokenizer.logit_laplace_eps, config.loss

  def total(params):
    out = models.tokenizer.apply(
        {"params": params}, images, deterministic=False, rngs={"dropout": rng}
    )
    rec = out["reconstruction"]
    x = (images + 1) / 2 * (1 - 2 * eps) + eps
    b = jnp.exp(out["log_scale"])
    nll = jnp.mean(jnp.abs(jnp.log(x / (1 - x)) - out["mu"]) / b + jnp.log(2 * b * x * (1 - x)))
    fake = models.discriminator.apply({"params": state.disc_params}, rec)
    return (
        w.l2 * jnp.mean((rec - images) ** 2)
        + w.logit_laplace * nll
        + w.vq * out["vq_loss"]
        + adversarial_weight * jnp.mean(jax.nn.softplus(-fake))
    )

  return total


@pytest.mark.parametrize("adaptive", [False, True])
def test_generator_gradient_equals_direct_differentiation(tiny_config, adaptive):
  import optax

  tiny_config.discriminator.adaptive_weight = adaptive
  state, new, metrics = _one_step(tiny_config)
  images = IMAGES
  weight = float(metrics["adversarial_weight"])
  if not adaptive:
    assert weight == pytest.approx(tiny_config.loss.adversarial)
  else:  # 0.1 x ||d rec / d outputs|| / ||d adv / d outputs||, over the image-shaped outputs
    from vim_jax.trainers import losses

    models = tokenizer_step.build_models(tiny_config)
    rng = jax.random.fold_in(jax.random.key(tiny_config.seed), 0)
    out = models.tokenizer.apply(
        {"params": state.params}, images, deterministic=False, rngs={"dropout": rng}
    )
    images_out = {k: out[k] for k in ("reconstruction", "mu", "log_scale") if k in out}
    rec = lambda d: losses.weighted_total(
        losses.reconstruction_terms(
            {**d, "vq_loss": out["vq_loss"]}, images, models.tokenizer.logit_laplace_eps
        ),
        tiny_config.loss.to_dict(),
    )
    adv = lambda d: losses.generator_adversarial_loss(
        models.discriminator.apply({"params": state.disc_params}, d["reconstruction"]),
        tiny_config.discriminator.loss,
    )
    norm = lambda g: np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
    grad_rec, grad_adv = jax.jit(lambda d: (jax.grad(rec)(d), jax.grad(adv)(d)))(images_out)
    expected = 0.1 * norm(grad_rec) / (norm(grad_adv) + 1e-4)
    assert weight == pytest.approx(expected, rel=1e-4)
  total = _independent_generator_loss(tiny_config, state, images, weight)
  value, grads = jax.jit(jax.value_and_grad(total))(state.params)
  assert float(metrics["loss"]) == pytest.approx(float(value), rel=1e-5)
  grad_norm = float(optax.tree.norm(grads))
  assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)
  # Per leaf: Adam's first moment after one step is (1 - b1) x the clipped gradient.
  opt = tiny_config.optimizer
  clip = min(1.0, opt.grad_clip_norm / grad_norm)
  expected = jax.tree.map(lambda g: (1 - opt.b1) * clip * np.asarray(g, np.float64), grads)
  mu = optax.tree_utils.tree_get(new.opt_state, "mu")
  flat = lambda tree: {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  assert_leaves_close(flat({"params": expected}), flat({"params": mu}), rel=1e-3)


def test_perceptual_gradient_reaches_the_tokenizer_through_the_reconstruction(tiny_config):
  """The perceptual term alone (every other weight 0), with a smooth stand-in for LPIPS that
  has its calling convention (images, reconstructions) -> [B] and frozen params: the step's
  gradient in the decoder is the derivative of its loss, checked by central differences of
  that loss (the same jitted step, run at params moved along a direction u) against
  <gradient, u>, the gradient read back from Adam's first moment; the encoder gets one too
  (straight through). A stop_gradient on the reconstruction before LPIPS leaves the value (and
  loss_perceptual > 0) as it is but makes the gradient 0, so it fails. (The real network's
  gradient: test_lpips.py.)"""
  import flax.linen as nn
  import optax

  class Perceptual(nn.Module):
    """mean over pixels of w_c (x - y)^2 + 0.1 sin(3 x y): [B, H, W, 3] twice -> [B]."""

    @nn.compact
    def __call__(self, x, y):
      w = self.param("w", nn.initializers.ones, (3,))
      return jnp.mean(w * (x - y) ** 2 + 0.1 * jnp.sin(3 * x * y), axis=(1, 2, 3))

  # Plain outputs: logit-Laplace's clip to [-1, 1] would put kinks in the difference quotients.
  tiny_config.model.logit_laplace = False
  tiny_config.loss.update(l2=0.0, logit_laplace=0.0, vq=0.0, adversarial=0.0, perceptual=1.0)
  models = tokenizer_step.TokenizerModels(
      tokenizer_step.build_models(tiny_config).tokenizer, None, Perceptual()
  )
  perceptual_params = {"w": jnp.array([0.5, 1.0, 2.0])}
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(tiny_config)
  init = tokenizer_step.make_init_fn(models, tx, disc_tx, tiny_config, init_batch=1)
  state = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  step = jax.jit(tokenizer_step.make_train_step(models, tx, schedule, disc_tx, tiny_config))
  new, metrics = step(state, {"image": IMAGES}, perceptual_params)
  loss_at = lambda params: float(
      step(state.replace(params=params), {"image": IMAGES}, perceptual_params)[1]["loss"]
  )
  assert float(metrics["loss_perceptual"]) == float(metrics["loss"]) > 0
  grad_norm = float(metrics["grad_norm"])
  assert grad_norm > 0
  # Adam's first moment after one step: (1 - b1) x the gradient clipped to grad_clip_norm.
  opt = tiny_config.optimizer
  scale = (1 - opt.b1) * min(1.0, opt.grad_clip_norm / grad_norm)
  grads = jax.tree.map(
      lambda m: np.asarray(m, np.float64) / scale, optax.tree_utils.tree_get(new.opt_state, "mu")
  )
  assert float(optax.tree.norm(grads)) == pytest.approx(grad_norm, rel=1e-4)
  assert float(optax.tree.norm(grads["encoder"])) > 1e-3 * grad_norm

  # Directions in the decoder's params (all of them, its first and its last layer): through the
  # encoder the loss is piecewise constant (the code lookup), and the straight-through gradient
  # is no derivative of it.
  def only(*path):
    keep = lambda p: tuple(getattr(k, "key", None) for k in p[: len(path)]) == path
    return jax.tree_util.tree_map_with_path(lambda p, g: g if keep(p) else 0 * g, grads)

  directions = {
      "decoder": only("decoder"),
      "from_code": only("decoder", "from_code"),
      "output_ffn": only("decoder", "output_ffn"),
  }
  h = 1e-3
  for name, u in directions.items():
    u_norm = float(optax.tree.norm(u))
    u = jax.tree.map(lambda x: x / u_norm, u)  # unit length
    move = lambda sign: jax.tree.map(
        lambda p, d: (p + sign * h * d).astype(p.dtype), state.params, u
    )
    finite_difference = (loss_at(move(1)) - loss_at(move(-1))) / (2 * h)
    directional = sum(
        float(np.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(u))
    )
    print(f"\n{name}: central difference {finite_difference:.6f}, <gradient, u> {directional:.6f}")
    # rel: the loss (about 1) is float32, so each evaluation is within ulp = 6e-8 and the
    # difference quotient within 2 ulp / 2h = 6e-5 (absolute); the Taylor remainder is O(h^2)
    # relative. Measured agreement: 5e-5. The gradient with stop_gradient on the
    # reconstruction is 0, which no tolerance below 1 lets through.
    assert finite_difference == pytest.approx(directional, rel=1e-3), name


def test_the_regular_step_holds_nothing_for_r1(tiny_config):
  """Lazy R1 is a second compiled step, not a lax.cond in every step: neither program holds a
  cond, the regular one computes no input gradient of D (fewer FLOPs, both counts) and needs
  no more memory than the R1 step; a run without R1 (gamma 0) has only the regular step."""
  import flax.linen as nn

  from vim_jax.infra import flops
  from vim_jax.trainers import compiling

  models = tokenizer_step.build_models(tiny_config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(tiny_config)
  init = tokenizer_step.make_init_fn(models, tx, disc_tx, tiny_config, init_batch=1)
  state = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  steps = tokenizer_step.make_train_steps(models, tx, schedule, disc_tx, tiny_config)
  assert sorted(steps) == [False, True]
  compiled, counted = {}, {}
  for with_r1, fn in steps.items():
    jaxpr = jax.make_jaxpr(fn)(state, {"image": IMAGES}, {})
    assert "cond[" not in str(jaxpr), with_r1
    compiled[with_r1], counted[with_r1] = compiling.compile_step(
        jax.jit(fn), state, {"image": IMAGES}, {}
    )
  assert counted[False].model < counted[True].model
  assert counted[False].hardware < counted[True].hardware
  memory = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert memory[False] <= memory[True], memory
  mean = flops.mean_over_cycle(
      counted[False], counted[True], tokenizer_step.r1_interval(tiny_config)
  )
  assert counted[False].model < mean.model < counted[True].model
  assert [tokenizer_step.is_r1_step(tiny_config, s) for s in range(6)] == [
      True,
      False,
      False,
      False,
      True,
      False,
  ]
  tiny_config.discriminator.r1_gamma = 0.0
  assert list(tokenizer_step.make_train_steps(models, tx, schedule, disc_tx, tiny_config)) == [
      False
  ]
  assert not tokenizer_step.is_r1_step(tiny_config, 0)
