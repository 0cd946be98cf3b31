"""Stage 2's step functions (vim_jax/trainers/vim_step.py) at unit level: the reported bits per
token against a float64 numpy negative log-likelihood. The trainer end to end:
test_vim_trainer.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vim_base
from vim_jax.data import pipeline
from vim_jax.infra import parallel
from vim_jax.models import vim as vim_lib
from vim_jax.trainers import train_state, vim_step

V, N, B = 32, 16, 4


class _TokenSource:
  """Pre-tokenized examples, as a tokens source gives them."""

  num_classes = 6

  def __init__(self, tokens, labels):
    self.tokens, self.labels = tokens, labels

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, i):
    return {"tokens": self.tokens[i], "label": int(self.labels[i])}


def _numpy_nll(model, params, tokens, labels):
  """Mean over the examples and their N positions of -log softmax(logits)[next token], from the
  full forward's logits, in float64 (nats)."""
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens, labels), np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.mean(np.take_along_axis(log_probs, np.asarray(tokens)[..., None], -1))


def test_bits_per_token_is_the_numpy_nll_in_bits():
  """The train step's loss and bits_per_token (at the params before the update; no dropout,
  no label dropout) and vim_step.evaluate's, over a two-batch eval pass, equal the numpy NLL and
  NLL / ln 2. (The former check, bits == loss / ln 2 of the same run, held by construction.)"""
  config = vim_base.get_config("tiny")
  config.model.update(
      num_layers=1, width=32, num_heads=2, head_dim=16, mlp_dim=64, dropout=0.0, loss_chunk=8
  )
  config.label_dropout = 0.0
  model = vim_lib.VIM.from_config(config, vocab_size=V, num_tokens=N)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (2 * B, N)).astype(np.int32)
  labels = rng.integers(0, 6, 2 * B).astype(np.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:1], labels[:1]))
  params = params["params"]
  tx, schedule = vim_step.build_optimizer(config)
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  step = jax.jit(vim_step.make_train_step(model, None, tx, schedule, config))
  _, metrics = step(state, {"tokens": tokens[:B], "label": labels[:B]}, None)
  nll = _numpy_nll(model, params, tokens[:B], labels[:B])
  assert float(metrics["loss"]) == pytest.approx(nll, rel=1e-5)
  assert float(metrics["bits_per_token"]) == pytest.approx(nll / np.log(2), rel=1e-5)

  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  eval_data = pipeline.InputPipeline(
      _TokenSource(tokens, labels), B, 32, seed=0, train=False, num_workers=1
  )
  eval_fn = jax.jit(vim_step.make_eval_step(model, None))
  result = vim_step.evaluate(eval_fn, params, None, eval_data, mesh)
  nll = _numpy_nll(model, params, tokens, labels)
  assert result["num_images"] == 2 * B
  assert result["loss"] == pytest.approx(nll, rel=1e-5)
  assert result["bits_per_token"] == pytest.approx(nll / np.log(2), rel=1e-5)
