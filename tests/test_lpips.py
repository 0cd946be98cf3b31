"""LPIPS: conversion of the published PyTorch layouts, equality with PyTorch, the missing-file
error, and the perceptual loss through vim_jax.main."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from lpips_reference import VGG_CONVS
from run_files import cli_env

from vim_jax.models import lpips
from vim_jax.tools import convert_lpips


def torch_lpips(vgg, head, x, y):
  """Independent LPIPS v0.1 in PyTorch (NCHW), following the lpips package's definition."""
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def features(z):
    z = (z - shift) / scale
    taps = []
    for i, _, _ in VGG_CONVS:
      if i in (5, 10, 17, 24):
        z = F.max_pool2d(z, 2, 2)
      z = F.relu(F.conv2d(z, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
      if i in (2, 7, 14, 21, 28):
        taps.append(z)
    return taps

  total = 0
  for k, (fx, fy) in enumerate(zip(features(x), features(y))):
    nx = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + 1e-10)
    ny = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + 1e-10)
    d = F.conv2d((nx - ny) ** 2, head[f"lin{k}.model.1.weight"])
    total = total + d.mean(dim=(2, 3))
  return total[:, 0]


@pytest.fixture(scope="module")
def converted(lpips_files):
  return lpips_files["vgg"], lpips_files["head"], lpips_files["flax"]


def test_flax_lpips_equals_pytorch(converted):
  vgg, head, path = converted
  params = lpips.load_params(path)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 48, 48, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  ours = np.asarray(lpips.LPIPS().apply(params, jnp.asarray(x), jnp.asarray(y)))
  to_nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref = torch_lpips(vgg, head, to_nchw(x), to_nchw(y)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
  assert np.all(ref > 0)


def test_distance_is_zero_for_identical_images_and_grows_with_noise(converted):
  params = lpips.load_params(converted[2])
  distance = jax.jit(lpips.LPIPS().apply)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  assert np.allclose(np.asarray(distance(params, x, x)), 0.0, atol=1e-7)
  dists = []
  for sigma in (0.05, 0.2, 0.5):
    noisy = jnp.clip(x + sigma * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
    dists.append(np.asarray(distance(params, x, noisy)))
  assert np.all(dists[0] < dists[1]) and np.all(dists[1] < dists[2])


def test_a_bfloat16_tokenizer_reports_float32_lpips(converted, tiny_config):
  """The eval step (and the loss) of a bf16 tokenizer measure LPIPS with the float32 network,
  at full precision. A bf16 VGG, what the model's dtype gave it before, is off by 2e-4 with
  these random weights: 10x the tolerance, so the check tells them apart."""
  import flax.linen as nn

  from vim_jax.trainers import tokenizer_step

  tiny_config.model.dtype = "bfloat16"
  tiny_config.perceptual_weights = converted[2]
  models = tokenizer_step.build_models(tiny_config)
  assert models.lpips.dtype == jnp.float32
  params = lpips.load_params(converted[2])["params"]
  images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  tokenizer_params = nn.meta.unbox(jax.jit(models.tokenizer.init)(jax.random.key(1), images))
  out = jax.jit(tokenizer_step.make_eval_step(models))(
      tokenizer_params["params"], {"image": images}, params
  )
  recon = out["reconstruction"].astype(jnp.float32)
  float32 = np.asarray(lpips.LPIPS().apply({"params": params}, images, recon))
  bfloat16 = np.asarray(lpips.LPIPS(jnp.bfloat16).apply({"params": params}, images, recon))
  print(
      f"\nLPIPS of a bf16 tokenizer's reconstructions: eval step {np.asarray(out['lpips'])}, "
      f"float32 network {float32}, bf16 network {bfloat16}"
  )
  np.testing.assert_allclose(out["lpips"], float32, rtol=0, atol=1e-5)
  assert np.abs(bfloat16 - float32).max() > 1e-4


def test_no_gradient_reaches_the_frozen_weights(converted):
  params = lpips.load_params(converted[2])
  x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)

  def loss(p, y):
    return jnp.sum(lpips.LPIPS().apply(jax.lax.stop_gradient(p), x, y))

  g_params, g_y = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x * 0.5)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_params))
  assert float(jnp.abs(g_y).max()) > 0


def test_converter_rejects_wrong_layouts(converted):
  vgg, head, _ = converted
  vgg_np = {k: v.numpy() for k, v in vgg.items()}
  head_np = {k: v.numpy() for k, v in head.items()}
  with pytest.raises(KeyError, match="features.0.weight"):
    convert_lpips.convert({k: v for k, v in vgg_np.items() if k != "features.0.weight"}, head_np)
  with pytest.raises(KeyError, match="lin0.model.1.weight"):
    convert_lpips.convert(vgg_np, {"lin0.weight": head_np["lin0.model.1.weight"]})
  bad = dict(head_np, **{"lin1.model.1.weight": np.zeros((1, 3, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"expected \(1, 128, 1, 1\)"):
    convert_lpips.convert(vgg_np, bad)


def test_missing_weights_error_names_path_and_commands(tiny_config, tmp_path):
  from vim_jax.trainers import tokenizer as tokenizer_trainer

  tiny_config.loss.perceptual = 0.1
  tiny_config.perceptual_weights = str(tmp_path / "nowhere.msgpack")
  with pytest.raises(FileNotFoundError) as e:
    tokenizer_trainer.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert "nowhere.msgpack" in str(e.value)
  assert "python -m vim_jax.tools.convert_lpips" in str(e.value)


def test_tiny_full_objective_end_to_end_through_main(converted, tmp_path):
  """`python -m vim_jax.main` on the tiny stage-1 config with all five loss terms (LPIPS
  converted from random-weight published-layout files): the files and scalars a user looks at,
  then the finished command rerun, which resumes at the end and trains nothing more."""
  workdir = str(tmp_path / "full")
  args = [
      sys.executable,
      "-m",
      "vim_jax.main",
      "--config=configs/vitvq_base.py:tiny",
      f"--workdir={workdir}",
      "--config.loss.perceptual=0.1",
      f"--config.perceptual_weights={converted[2]}",
      "--config.total_steps=4",
      "--config.eval_every=4",
      "--config.checkpoint_every=2",
      "--config.log_every=2",
      "--config.num_eval_images=16",
      "--config.eval_batch_size=8",
      "--config.ema_decay=0.9",
      "--config.batch_size=8",
  ]  # VGG16 dominates a step
  proc = subprocess.run(
      args, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LPIPS weights:" in proc.stderr and "lpips=" in proc.stderr
  assert "eval at step 4" in proc.stderr and "TFLOP/s/device" in proc.stderr
  assert "per-device memory" in proc.stderr and "ETA" in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.path.exists(os.path.join(workdir, "images", "reconstructions_00000004.png"))
  from test_configs import _event_tags

  tags = _event_tags(workdir)
  for tag in (
      "train/loss",
      "train/loss_perceptual",
      "train/loss_adversarial",
      "train/loss_logit_laplace",
      "train/loss_l2",
      "train/loss_vq",
      "train/learning_rate",
      "train/grad_norm",
      "train/codebook_usage",
      "train/perplexity",
      "train/images_per_sec_per_device",
      "train/tflops_per_sec_per_device",
      "disc/loss",
      "disc/logits_real",
      "disc/logits_fake",
      "disc/r1_penalty",
      "eval/lpips",
      "eval/psnr",
      "eval/ssim",
      "eval/codebook_usage",
      "eval/codebook_usage_per_256",
      "eval/inputs_and_reconstructions",
  ):
    assert tag in tags, (tag, sorted(tags))

  again = subprocess.run(
      args, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
  )
  assert again.returncode == 0 and "resumed at step 4" in again.stderr, again.stderr[-3000:]
