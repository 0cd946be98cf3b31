"""The factorized l2-normalized quantizer and the tokenizer's index round trip."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax.models import quantizer as quantizer_lib
from vim_jax.models import tokenizer as tokenizer_lib


def _quantize(l2: bool, z: np.ndarray, k: int = 64):
  vq = quantizer_lib.VectorQuantizer(
      codebook_size=k, code_dim=z.shape[-1], l2_normalize=l2, beta=0.25
  )
  params = nn.meta.unbox(vq.init(jax.random.key(0), z))
  z_st, idx, aux = vq.apply(params, z)
  return vq, params, z_st, idx, aux


@pytest.mark.parametrize("l2", [True, False])
def test_outputs_are_codebook_rows_and_nearest(l2):
  z = np.random.default_rng(0).normal(size=(2, 10, 8)).astype(np.float32)
  vq, params, z_st, idx, aux = _quantize(l2, z)
  codebook = np.asarray(params["params"]["codebook"], np.float64)
  zz = z.astype(np.float64)
  if l2:
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    zz /= np.linalg.norm(zz, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z_st), axis=-1), 1.0, atol=1e-5)
  dists = ((zz[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(idx), dists.argmin(-1))
  np.testing.assert_allclose(np.asarray(z_st), codebook[np.asarray(idx)], atol=1e-5)
  # VQ loss: ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (means), both equal in value here.
  mse = np.mean((zz - codebook[np.asarray(idx)]) ** 2)
  np.testing.assert_allclose(float(aux["vq_loss"]), 1.25 * mse, rtol=1e-4)


def test_straight_through_gradient_reaches_the_normalized_latent():
  z = np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)
  vq, params, *_ = _quantize(True, z)
  target = np.random.default_rng(2).normal(size=z.shape).astype(np.float32)

  def downstream(z):  # a loss on the quantized output only
    z_st, _, _ = vq.apply(params, z)
    return jnp.sum(z_st * target)

  grad = np.asarray(jax.grad(downstream)(z))
  # Straight-through on the normalized latent: d/dz of sum(normalize(z) * target).
  expected = np.asarray(jax.grad(lambda z: jnp.sum(quantizer_lib.l2_normalize(z) * target))(z))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert np.abs(grad).sum() > 0


def test_codebook_statistics_closed_form():
  stats = quantizer_lib.codebook_statistics(jnp.array([0, 0, 1, 3]), codebook_size=8)
  np.testing.assert_array_equal(np.asarray(stats["counts"]), [2, 1, 0, 1, 0, 0, 0, 0])
  assert float(stats["codebook_usage"]) == pytest.approx(3 / 8)
  p = np.array([0.5, 0.25, 0.25])
  assert float(stats["perplexity"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
  uniform = quantizer_lib.codebook_statistics(jnp.arange(16) % 4, codebook_size=4)
  assert float(uniform["perplexity"]) == pytest.approx(4.0, rel=1e-6)


def _normalized(x, eps=1e-6):
  """float64 x / sqrt(||x||^2 + eps) and the norm, along the last axis (l2_normalize's form)."""
  norm = np.sqrt(np.sum(x**2, -1, keepdims=True) + eps)
  return x / norm, norm


def _normalize_vjp(x, cotangent, eps=1e-6):
  """The cotangent of x from the cotangent of x / r, r = sqrt(||x||^2 + eps):
  g / r - x (x . g) / r^3 (the Jacobian I / r - x x^T / r^3 is symmetric)."""
  _, r = _normalized(x, eps)
  return cotangent / r - x * np.sum(x * cotangent, -1, keepdims=True) / r**3


def _vq_gradients(z, codebook, beta, upstream=None):
  """float64 closed forms of the gradients of ||sg[zh] - e||^2 + beta ||zh - sg[e]||^2 (means
  over every element; zh, e the l2-normalized latent and its code) plus, when given, the
  upstream cotangent of the quantized output carried straight through to zh.

  The codebook term moves the codes only: d/d e_k = sum over the tokens that chose k of
  2 (e_k - zh_n) / M. The commitment term moves the latent only: d/d zh_n = 2 beta (zh_n - e_n)
  / M. Both go through the normalizations' Jacobians. Returns (d/d z, d/d codebook, indices).
  """
  zh, _ = _normalized(z)
  ch, _ = _normalized(codebook)
  indices = np.argmax(zh @ ch.T, -1)  # cosine similarity on unit vectors
  e = ch[indices]
  m = z.size
  d_codes = np.zeros_like(ch)
  np.add.at(d_codes, indices.reshape(-1), (2 * (e - zh) / m).reshape(-1, z.shape[-1]))
  d_zh = 2 * beta * (zh - e) / m + (0.0 if upstream is None else upstream)
  return _normalize_vjp(z, d_zh), _normalize_vjp(codebook, d_codes), indices


def test_vq_loss_gradients_reach_codebook_and_latent_by_their_own_terms():
  """The two terms of the VQ loss have equal values, so only their gradients tell them apart:
  the codebook entries get the codebook term's gradient alone (not scaled by beta), the latent
  gets beta x the commitment term's plus the downstream gradient through the straight-through
  estimator on the normalized latent, and nothing else. Against float64 closed forms: fails if
  beta weighs the codebook term, if either stop_gradient is missing, or if the estimator passes
  the gradient to the codes or to the unnormalized latent."""
  beta = 0.25
  z = np.random.default_rng(3).normal(size=(2, 6, 4)).astype(np.float32)
  vq = quantizer_lib.VectorQuantizer(codebook_size=8, code_dim=4, beta=beta)
  params = nn.meta.unbox(vq.init(jax.random.key(4), z))
  target = np.random.default_rng(5).normal(size=z.shape).astype(np.float32)

  def loss(params, z):
    z_st, _, aux = vq.apply(params, z)
    return aux["vq_loss"] + jnp.sum(z_st * target), aux["vq_loss"]

  (d_params, d_z), _ = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, z)
  codebook = np.asarray(params["params"]["codebook"], np.float64)
  zz = z.astype(np.float64)
  expected_z, expected_codebook, indices = _vq_gradients(zz, codebook, beta, upstream=target)
  assert len(np.unique(indices)) > 1  # several codes move
  np.testing.assert_array_equal(np.asarray(vq.apply(params, z)[1]), indices)
  np.testing.assert_allclose(
      np.asarray(d_params["params"]["codebook"]), expected_codebook, rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(np.asarray(d_z), expected_z, rtol=1e-4, atol=1e-7)
  # The VQ loss alone, where beta x the commitment gradient is all the latent gets.
  d_params, d_z = jax.grad(lambda p, z: loss(p, z)[1], argnums=(0, 1))(params, z)
  expected_z, expected_codebook, _ = _vq_gradients(zz, codebook, beta)
  np.testing.assert_allclose(
      np.asarray(d_params["params"]["codebook"]), expected_codebook, rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(np.asarray(d_z), expected_z, rtol=1e-4, atol=1e-8)


def test_tokenizer_gradients_reach_encoder_and_codebook_by_their_terms(tiny_config):
  """The tokenizer's loss mean(reconstruction^2) + vq_loss, differentiated as a whole, against a
  second computation: the codebook's gradient is the codebook term's closed form alone (the
  reconstruction reaches the codes only through the straight-through estimator, which passes
  nothing to them); the encoder's is its output's vector-Jacobian product with the closed form
  of beta x the commitment term plus the decoder's gradient at the codes, carried through the
  latent's normalization."""
  model = tokenizer_lib.ViTVQGAN.from_config(tiny_config)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), images))["params"]

  def loss(p):
    out = model.apply({"params": p}, images)
    return jnp.mean(out["reconstruction"] ** 2) + out["vq_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  encode = lambda p: model.apply({"params": p}, images, method=lambda m, x: m.encoder(x))
  z = np.asarray(jax.jit(encode)(params), np.float64)
  codebook = np.asarray(params["quantizer"]["codebook"], np.float64)
  _, _, indices = _vq_gradients(z, codebook, model.beta)
  codes = _normalized(codebook)[0][indices].astype(np.float32)
  decoder_grad = jax.jit(
      jax.grad(
          lambda c: jnp.mean(
              model.apply({"params": params}, c, method=lambda m, c: m.decode(c)["reconstruction"])
              ** 2
          )
      )
  )(codes)
  expected_z, expected_codebook, _ = _vq_gradients(
      z, codebook, model.beta, upstream=np.asarray(decoder_grad)
  )
  np.testing.assert_allclose(
      np.asarray(grads["quantizer"]["codebook"]), expected_codebook, rtol=1e-4, atol=1e-8
  )
  (expected,) = jax.jit(lambda p, ct: jax.vjp(encode, p)[1](ct))(
      params, jnp.asarray(expected_z, jnp.float32)
  )
  flat = lambda tree: {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  got, expected = flat(grads["encoder"]), flat(expected["encoder"])
  assert got.keys() == expected.keys()
  scale = max(np.max(np.abs(ref)) for ref in expected.values())
  for name, ref in expected.items():  # (the key bias's gradient is 0: softmax ignores it)
    np.testing.assert_allclose(got[name], ref, rtol=1e-3, atol=1e-5 * scale, err_msg=name)


def test_indices_round_trip_through_decode_from_indices(tiny_config):
  model = tokenizer_lib.ViTVQGAN.from_config(tiny_config)
  images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), images))
  out = jax.jit(model.apply)(params, images)
  indices = jax.jit(lambda p, x: model.apply(p, x, method=model.encode_to_indices))(params, images)
  assert indices.shape == (3, 8, 8) and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(out["indices"]))
  decoded = model.apply(params, indices, method=model.decode_from_indices)
  assert decoded.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(out["reconstruction"]), atol=1e-5)
  # Re-encoding the codes themselves is stable: indices -> codes -> same indices.
  vq = model.bind(params).quantizer
  np.testing.assert_array_equal(np.asarray(vq.lookup(vq.embed(indices))), np.asarray(indices))


def _near_ties(rows: int = 32, d: int = 32, gap: float = 1e-4, seed: int = 0):
  """Unit latents z [rows, d] and a codebook [3 rows, d] holding, for each latent, three codes
  whose cosine similarities to it are 0.9, 0.9 - gap and 0.9 - 2 gap (in random order): the
  top two differ by `gap`, under bf16's resolution (2^-8 relative, ~4e-3 at 0.9). The other
  latents' codes are random directions, far below."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  z = unit(rng.normal(size=(rows, d)))
  codes = []
  for latent in z:
    side = rng.normal(size=(3, d))
    side = unit(side - (side @ latent)[:, None] * latent)  # orthogonal to the latent
    cos = 0.9 - gap * rng.permutation(3)
    codes.append(cos[:, None] * latent + np.sqrt(1 - cos**2)[:, None] * side)
  return z.astype(np.float32), np.concatenate(codes).astype(np.float32)


def test_near_ties_pick_the_float64_nearest_code():
  """Codes 1e-4 apart in cosine similarity: the lookup picks float64's nearest for every latent
  (l2 and Euclidean). The same scores from bf16-rounded inputs, which is what a TPU's default
  float32 matmul computes (one bf16 pass), pick another code for most of them: the case is a
  real near-tie, not one any precision resolves."""
  import ml_dtypes

  z, codebook = _near_ties()
  zn, _ = _normalized(z.astype(np.float64))
  cn, _ = _normalized(codebook.astype(np.float64))
  expected = np.argmax(zn @ cn.T, -1)
  bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)
  one_bf16_pass = np.argmax(bf16(zn) @ bf16(cn).T, -1)
  assert np.sum(one_bf16_pass != expected) >= len(z) // 4
  for l2 in (True, False):
    vq = quantizer_lib.VectorQuantizer(
        codebook_size=len(codebook), code_dim=z.shape[-1], l2_normalize=l2
    )
    params = {"params": {"codebook": jnp.asarray(codebook)}}
    _, indices, _ = jax.jit(vq.apply)(params, z[None])
    if l2:
      reference = expected
    else:  # Euclidean on the raw (unit, to float32 rounding) vectors
      zz, cc = z.astype(np.float64), codebook.astype(np.float64)
      reference = np.argmin(((zz[:, None] - cc) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(np.asarray(indices[0]), reference, err_msg=f"l2={l2}")


def _dot_generals(jaxpr):
  """Every dot_general equation of a jaxpr, nested ones (jit, custom_vjp, scan...) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          found += _dot_generals(sub)
  return found


@pytest.mark.parametrize("l2", [True, False])
def test_every_lookup_product_runs_at_highest_precision(l2):
  """A CPU computes float32 products in float32 whatever the precision says, so the near-tie test
  above cannot fail here for a missing precision: the traced program must ask for HIGHEST on
  every dot (forward and gradient) and take float32 operands, which TPU and GPU then honour."""
  z = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  vq = quantizer_lib.VectorQuantizer(codebook_size=16, code_dim=8, l2_normalize=l2)
  params = nn.meta.unbox(vq.init(jax.random.key(0), z))

  def loss(params, z):
    z_st, _, aux = vq.apply(params, z)
    return jnp.sum(z_st) + aux["vq_loss"]

  for fn in (
      lambda p, z: vq.apply(p, z),
      jax.grad(loss, argnums=(0, 1)),
      lambda p, z: vq.apply(p, z.astype(jnp.bfloat16)),
  ):
    dots = _dot_generals(jax.make_jaxpr(fn)(params, z).jaxpr)
    assert dots, "the lookup's product was not found in the jaxpr"
    for eqn in dots:
      precision = eqn.params["precision"]
      assert precision == (jax.lax.Precision.HIGHEST,) * 2, eqn
      assert all(v.aval.dtype == jnp.float32 for v in eqn.invars), eqn


def test_the_tpu_program_keeps_the_lookup_product_at_highest_precision():
  """libtpu's compile for a v4 chip (compile-only, no TPU needed): the lookup's product, fused
  with the argmax, is a float32 convolution with operand_precision={highest,highest} and its
  operands are not converted to bf16 first."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from vim_jax.infra import tpu_slices

  devices = tpu_slices.compile_only_devices(tpu_slices.parse("v4-8"))
  replicated = NamedSharding(Mesh(np.array(devices[:1]), ("data",)), PartitionSpec())
  vq = quantizer_lib.VectorQuantizer(codebook_size=1024, code_dim=32)
  lookup = lambda codebook, z: vq.apply({"params": {"codebook": codebook}}, z)[1]
  shapes = (
      jax.ShapeDtypeStruct((1024, 32), jnp.float32, sharding=replicated),
      jax.ShapeDtypeStruct((4, 256, 32), jnp.float32, sharding=replicated),
  )
  text = jax.jit(lookup).lower(*shapes).compile().as_text()
  products = [
      line
      for line in text.splitlines()
      if ("convolution(" in line or " dot(" in line) and "lookup" in line
  ]
  assert products, text
  for line in products:
    assert "operand_precision={highest,highest}" in line and "= f32[" in line, line
  assert not re.search(r"bf16\[[0-9,]*\]\S* convert\(", text), text
