"""FID InceptionV3: the Flax network and converter against an independent PyTorch computation
(tests/inception_reference.py)."""

import numpy as np
import pytest
import torch

F = torch.nn.functional


@pytest.fixture(scope="module")
def converted(inception_files):
  """(the reference network with its random weights, the converted Flax file)."""
  from inception_reference import TorchFIDInception

  ref = TorchFIDInception()
  ref.state = torch.load(inception_files["pth"], weights_only=True)
  return ref, inception_files["flax"]


def test_flax_inception_equals_pytorch_reference(converted):
  import jax

  from vim_jax.models import inception

  ref, weights = converted
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 48, 48, 3)).astype(np.float32) / 255.0  # upsampled to 299
  with torch.no_grad():
    pool_ref, unbiased_ref, logits_ref = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  params = inception.load_params(weights)["params"]
  out = jax.jit(inception.InceptionV3FID().apply)({"params": params}, images)
  pool, logits = np.asarray(out["pool"]), np.asarray(out["logits"])
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  np.testing.assert_allclose(
      out["logits_unbiased"], unbiased_ref.numpy(), rtol=1e-4, atol=1e-4 * np.abs(logits).max()
  )
  pool_diff = np.abs(pool - pool_ref.numpy()).max()
  logits_diff = np.abs(logits - logits_ref.numpy()).max()
  print(
      f"\nmax |flax - torch|: pool features {pool_diff:.3g} (max |feature| "
      f"{np.abs(pool).max():.3g}), logits {logits_diff:.3g}"
  )
  np.testing.assert_allclose(pool, pool_ref.numpy(), rtol=1e-4, atol=1e-4 * np.abs(pool).max())
  np.testing.assert_allclose(
      logits, logits_ref.numpy(), rtol=1e-4, atol=1e-4 * np.abs(logits).max()
  )


@pytest.mark.parametrize("size", [32, 64, 512])
def test_resize_matches_pytorch_bilinear(size):
  """pytorch-fid's F.interpolate(bilinear, align_corners=False), up and down."""
  import jax.numpy as jnp

  from vim_jax.models import inception

  x = np.random.default_rng(size).uniform(size=(1, size, size, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_to_input(jnp.asarray(x), "bilinear"))
  ref = (
      F.interpolate(
          torch.from_numpy(x.transpose(0, 3, 1, 2)),
          size=(299, 299),
          mode="bilinear",
          align_corners=False,
      )
      .numpy()
      .transpose(0, 2, 3, 1)
  )
  np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_converter_rejects_wrong_files(converted, tmp_path):
  from vim_jax.tools import convert_inception

  ref, _ = converted
  state = {k: v.float().numpy() for k, v in ref.state.items() if v.is_floating_point()}
  with pytest.raises(KeyError, match="missing"):
    convert_inception.convert({k: v for k, v in state.items() if k != "fc.bias"})
  with pytest.raises(KeyError, match="auxiliary head"):
    convert_inception.convert({**state, "AuxLogits.fc.weight": np.zeros((1000, 768))})
  with pytest.raises(ValueError, match="1008-class"):
    convert_inception.convert(
        {
            **state,
            "fc.weight": np.zeros((1000, 2048), np.float32),
            "fc.bias": np.zeros(1000, np.float32),
        }
    )


def test_missing_weights_error_names_path_and_command(tmp_path):
  from vim_jax.models import inception

  path = str(tmp_path / "nope.msgpack")
  with pytest.raises(FileNotFoundError) as e:
    inception.load_params(path)
  assert path in str(e.value) and "python -m vim_jax.tools.convert_inception" in str(e.value)
