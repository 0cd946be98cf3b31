"""Stage-1 trainer: 1 vs 8 devices, exact resume, NaN guard, evaluation helpers."""

import math

import jax
import numpy as np
import pytest

from vim_jax import stage1, train_vitvq


def _short(config, steps=2):
  config.update(total_steps=steps, log_every=1, eval_every=1000, checkpoint_every=1000,
                num_eval_images=16)
  return config


def _max_param_diff(a, b):
  pa, pb = train_vitvq.summarize_for_tests(a.state), train_vitvq.summarize_for_tests(b.state)
  assert pa.keys() == pb.keys()
  return max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "data2_fsdp2_tensor2"])
def test_eight_devices_match_one(tiny_config, tmp_path, mesh):
  config = _short(tiny_config)
  one = train_vitvq.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  config.mesh.update(**mesh)
  eight = train_vitvq.train_and_evaluate(config, str(tmp_path / "eight"))
  assert len(jax.tree.leaves(eight.state.params)[0].sharding.device_set) == 8
  for a, b in zip(one.train_metrics, eight.train_metrics):
    assert a["step"] == b["step"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
  assert _max_param_diff(one, eight) < 1e-5
  if mesh["tensor"] == 2:  # the layout is really sharded, not replicated
    kernel = eight.state.params["encoder"]["transformer"]["block_00"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)


def test_resume_is_exact(tiny_config, tmp_path):
  """With the GAN, generator EMA and LeCam on, so every checkpointed field is exercised."""
  config = _short(tiny_config, steps=4)
  config.ema_decay = 0.9
  config.discriminator.lecam_weight = 0.1
  straight = train_vitvq.train_and_evaluate(config, str(tmp_path / "straight"))
  interrupted_dir = str(tmp_path / "interrupted")
  first = train_vitvq.train_and_evaluate(config, interrupted_dir, should_stop=lambda s: s == 2)
  assert int(first.state.step) == 2
  resumed = train_vitvq.train_and_evaluate(config, interrupted_dir)
  assert int(resumed.state.step) == 4
  assert [m["step"] for m in resumed.train_metrics] == [3, 4]
  assert resumed.train_metrics[-1]["loss"] == straight.train_metrics[-1]["loss"]
  assert _max_param_diff(straight, resumed) == 0.0
  for field in ("disc_params", "disc_opt_state", "ema_params", "lecam_ema", "opt_state"):
    a, b = getattr(straight.state, field), getattr(resumed.state, field)
    assert not _changed(a, b), field
  # Running again after the end trains nothing and returns the same state.
  again = train_vitvq.train_and_evaluate(config, interrupted_dir)
  assert _max_param_diff(straight, again) == 0.0 and again.train_metrics == []


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  config = _short(tiny_config, steps=6)
  config.update(checkpoint_every=2, log_every=2)
  workdir = str(tmp_path / "nan")
  train_vitvq.train_and_evaluate(config, workdir, should_stop=lambda s: s == 2)
  config.optimizer.peak_lr = 1e30  # blows the parameters up on the next steps
  with pytest.raises(FloatingPointError, match=r"at step 4.*last good checkpoint is step 2"):
    train_vitvq.train_and_evaluate(config, workdir)
  from vim_jax import checkpoint
  assert checkpoint.Checkpointer(workdir + "/checkpoints").latest_step() == 2


def test_evaluation_reports_every_metric(tiny_config, tmp_path):
  config = _short(tiny_config, steps=2)
  config.update(eval_every=2, num_eval_images=20, eval_batch_size=8, eval_usage_chunk=8)
  result = train_vitvq.train_and_evaluate(config, str(tmp_path / "eval"))
  m = result.eval_metrics
  assert m["num_images"] == 20  # the padded last batch is masked out
  for key in ("psnr", "ssim", "l1", "l2", "codebook_usage", "codebook_usage_per_8", "perplexity"):
    assert math.isfinite(m[key]), key
  assert 0 < m["codebook_usage"] <= 1 and 1 <= m["perplexity"] <= 256
  assert m["psnr"] == pytest.approx(-10 * math.log10(m["l2"] / 4), abs=3.0)  # same ballpark


def test_usage_per_chunk_matches_definition():
  rng = np.random.default_rng(0)
  indices = rng.integers(0, 50, size=(10, 2, 2))
  expected = np.mean([np.unique(indices[s:s + 4]).size / 100 for s in (0, 4)])
  assert stage1.usage_per_chunk(indices, 100, 4) == pytest.approx(expected)
  assert stage1.usage_per_chunk(indices[:3], 100, 4) == pytest.approx(
      np.unique(indices[:3]).size / 100)


def _changed(a, b):
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _one_step(config):
  """Initial state and the state after one train step, built with the trainer's functions."""
  import flax.linen as nn
  config.optimizer.warmup_steps = 0  # lr > 0 at step 0, so one step moves the tokenizer
  models = stage1.build_models(config)
  tx, schedule, disc_tx = stage1.build_optimizers(config)
  init = stage1.make_init_fn(models, tx, disc_tx, config, init_batch=1)
  state = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  step = jax.jit(stage1.make_train_step(models, tx, schedule, disc_tx, config))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  new_state, metrics = step(state, {"image": images}, {})
  return state, new_state, metrics


def test_one_step_updates_generator_and_discriminator(tiny_config):
  tiny_config.update(ema_decay=0.5)
  tiny_config.discriminator.lecam_weight = 0.1
  state, new, metrics = _one_step(tiny_config)
  assert _changed(state.params, new.params)
  assert _changed(state.disc_params, new.disc_params)
  assert _changed(state.ema_params, new.ema_params)
  # EMA after one step: 0.5 * init + 0.5 * new params.
  expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema_params, new.params)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new.ema_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert float(metrics["disc/r1_penalty"]) > 0  # step 0 is an R1 step
  assert float(new.lecam_ema["real"]) == pytest.approx(0.01 * float(metrics["disc/logits_real"]),
                                                        rel=1e-5)
  for key in ("loss_adversarial", "disc/loss", "disc/logits_real", "disc/logits_fake"):
    assert math.isfinite(float(metrics[key])), key


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


def _direct_generator_grads(config, state, images, adversarial_weight):
  """The generator's gradient by plain jax.grad of the weighted total (an independent path
  from the step's explicit pull-back through the tokenizer's outputs)."""
  from vim_jax import losses
  models = stage1.build_models(config)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)

  def total(params):
    out = models.tokenizer.apply({"params": params}, images, deterministic=False,
                                 rngs={"dropout": rng})
    terms = losses.reconstruction_terms(out, images, models.tokenizer.logit_laplace_eps)
    value = losses.weighted_total(terms, config.loss.to_dict())
    fake = models.discriminator.apply({"params": state.disc_params}, out["reconstruction"])
    return value + adversarial_weight * losses.generator_adversarial_loss(
        fake, config.discriminator.loss)

  return jax.grad(total)(state.params)


@pytest.mark.parametrize("adaptive", [False, True])
def test_generator_gradient_equals_direct_differentiation(tiny_config, adaptive):
  import optax
  tiny_config.discriminator.adaptive_weight = adaptive
  state, _, metrics = _one_step(tiny_config)
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  weight = float(metrics["adversarial_weight"])
  if not adaptive:
    assert weight == pytest.approx(tiny_config.loss.adversarial)
  else:  # 0.1 x ||d rec / d outputs|| / ||d adv / d outputs||, over the image-shaped outputs
    from vim_jax import losses
    models = stage1.build_models(tiny_config)
    rng = jax.random.fold_in(jax.random.key(tiny_config.seed), 0)
    out = models.tokenizer.apply({"params": state.params}, images, deterministic=False,
                                 rngs={"dropout": rng})
    images_out = {k: out[k] for k in ("reconstruction", "mu", "log_scale") if k in out}
    rec = lambda d: losses.weighted_total(losses.reconstruction_terms(
        {**d, "vq_loss": out["vq_loss"]}, images, models.tokenizer.logit_laplace_eps),
        tiny_config.loss.to_dict())
    adv = lambda d: losses.generator_adversarial_loss(models.discriminator.apply(
        {"params": state.disc_params}, d["reconstruction"]), tiny_config.discriminator.loss)
    norm = lambda g: np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
    expected = 0.1 * norm(jax.grad(rec)(images_out)) / (norm(jax.grad(adv)(images_out)) + 1e-4)
    assert weight == pytest.approx(expected, rel=1e-4)
  grads = _direct_generator_grads(tiny_config, state, images, weight)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
