"""Importing enhancing-transformers' ViT-VQGAN: random weights in their checkpoint layout
(tests/enhancing_reference.py, an independent PyTorch implementation) imported into a workdir
must tokenize and reconstruct as the PyTorch model does; wrong files are refused by name."""

import argparse
import os

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from enhancing_reference import Tokenizer

from vim_jax import main
from vim_jax.infra import runs
from vim_jax.tools import import_enhancing

TINY = os.path.join(REPO_ROOT, "configs/enhancing_vitvq_small.py") + ":tiny"


@pytest.fixture(scope="module")
def reference():
  return Tokenizer()  # the tiny config's layout: 64 px, patch 8, width 64, 2 blocks


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
  folder = tmp_path_factory.mktemp("enhancing")
  ckpt = str(folder / "imagenet_vitvq_tiny.ckpt")
  torch.save(reference.lightning_checkpoint(step=1234), ckpt)
  workdir = str(folder / "run")
  import_enhancing.main([f"--ckpt={ckpt}", f"--config={TINY}", f"--workdir={workdir}"])
  return workdir


def _images(n=4, size=64, seed=0):
  """Noise images in [-1, 1] (ours) and the same in [0, 1], NCHW, float64 (theirs)."""
  images = np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  return images, torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2).double()


def test_imported_tokenizer_equals_the_pytorch_model(reference, imported):
  import jax

  from vim_jax.models import tokenizer as tokenizer_lib

  tok = runs.load_tokenizer(imported)
  assert tok.step == 1234 and tok.config.model.pixel_range == "zero_to_one"
  images, images01 = _images()
  ours = np.asarray(
      jax.jit(
          lambda p, x: tok.model.apply(
              {"params": p}, x, method=tokenizer_lib.ViTVQGAN.encode_to_indices
          )
      )(tok.params, images)
  )
  with torch.no_grad():
    theirs = reference.encode_codes(images01).numpy()
    their_recon = reference.decode_codes(torch.from_numpy(theirs)).numpy()
  equal = float(np.mean(ours.reshape(len(images), -1) == theirs))
  recon = np.asarray(
      jax.jit(
          lambda p, i: tok.model.apply(
              {"params": p}, i, method=tokenizer_lib.ViTVQGAN.decode_from_indices
          )
      )(tok.params, ours)
  )
  expected = their_recon.transpose(0, 2, 3, 1) * 2 - 1  # their [0, 1] output in our [-1, 1]
  worst = float(np.abs(recon - expected).max())
  print(
      f"\nequal code indices: {equal:.4f} of {theirs.size}; max |reconstruction difference| "
      f"{worst:.3g} (values up to {np.abs(expected).max():.3g}); codes used "
      f"{np.unique(theirs).size}"
  )
  assert equal == 1.0
  assert worst < 1e-4
  # The whole forward pass (encode, quantize, decode) as training and evaluation run it.
  full = jax.jit(tok.model.apply)({"params": tok.params}, images)
  np.testing.assert_array_equal(np.asarray(full["indices"]).reshape(len(images), -1), theirs)
  np.testing.assert_allclose(np.asarray(full["reconstruction"]), expected, atol=1e-4)


def test_older_key_names_and_bare_state_dicts_import_the_same(reference, imported, tmp_path):
  state = {k: v.float() for k, v in reference.state.items()}
  renamed = {
      k.replace("decoder.to_pixel.1.", "decoder.to_pixel.conv_out.").replace(
          "encoder.transformer.norm.", "encoder.norm."
      ): v
      for k, v in state.items()
  }
  path = str(tmp_path / "bare.pth")
  torch.save(renamed, path)
  config = main.load_config_file(TINY)
  step = import_enhancing.import_checkpoint(path, config, str(tmp_path / "run"))
  assert step == 0
  a, b = runs.load_tokenizer(imported).params, runs.load_tokenizer(str(tmp_path / "run")).params
  import jax

  jax.tree.map(np.testing.assert_array_equal, a, b)


def _refusal(state, config_spec=TINY):
  with pytest.raises(import_enhancing.CheckpointMismatch) as info:
    import_enhancing.convert(state, main.load_config_file(config_spec))
  return str(info.value)


def test_wrong_checkpoints_are_refused_by_name(reference, tmp_path):
  state = {k: v.float().numpy() for k, v in reference.state.items()}
  missing = dict(state)
  del missing["encoder.transformer.layers.1.0.fn.to_out.bias"]
  assert "missing encoder.transformer.layers.1.0.fn.to_out.bias" in _refusal(missing)
  extra = {**state, "encoder.transformer.layers.0.0.fn.to_q.weight": np.zeros((64, 64))}
  assert "unexpected encoder.transformer.layers.0.0.fn.to_q.weight (64, 64)" in _refusal(extra)
  shape = {**state, "pre_quant.bias": np.zeros(16, np.float32)}
  assert "pre_quant.bias has shape (16,); the config's model needs (32,)" in _refusal(shape)
  # Another model size: these (tiny) weights with the Base config.
  message = _refusal(state, os.path.join(REPO_ROOT, "configs/enhancing_vitvq_base.py"))
  assert "width 64, 2 encoder blocks" in message and "enhancing_vitvq_small.py" in message
  # Not one of their models: our paper config.
  assert "does not describe an enhancing-transformers" in _refusal(
      state, os.path.join(REPO_ROOT, "configs/vitvq_small.py")
  )
  moved = {**state, "encoder.en_pos_embedding": state["encoder.en_pos_embedding"][:, ::-1]}
  assert "differs from the 2-D sin-cos table" in _refusal(moved)
  # A checkpoint holding pickled objects beyond tensors: refused unless trusted.
  path = str(tmp_path / "pickled.ckpt")
  torch.save(
      {**reference.lightning_checkpoint(), "hyper_parameters": argparse.Namespace(a=1)}, path
  )
  with pytest.raises(import_enhancing.CheckpointMismatch, match="--trust_pickle"):
    import_enhancing.read_checkpoint(path)
  tokenizer, step = import_enhancing.read_checkpoint(path, trust_pickle=True)
  assert step == 1234 and not any(k.startswith("loss.") for k in tokenizer)
