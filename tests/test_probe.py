"""The linear probe's classifier (vim_jax/probe.py) against a float64 numpy solution; the probe
on a trained VIM: test_vim_trainer.py."""

import numpy as np

from vim_jax import probe


def _numpy_probe(train_x, train_y, eval_x, num_classes, steps=3000, lr=0.5):
  """Multinomial logistic regression in float64 numpy, full-batch gradient descent to
  convergence, on features standardised by the train split's mean and std: the eval split's
  predicted classes."""
  mean, std = train_x.mean(0), train_x.std(0)
  x, e = (train_x - mean) / std, (eval_x - mean) / std
  onehot = np.eye(num_classes)[train_y]
  w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
  for _ in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= lr * x.T @ (p - onehot) / len(x)
    b -= lr * (p - onehot).mean(0)
  return np.argmax(e @ w + b, axis=1)


def test_linear_probe_accuracy_equals_a_numpy_solution():
  """Three overlapping classes in 6-D (not separable, so the logistic solution is finite); an
  eval split of two classes, 27 + 3 points near their centres (so that standardising it by its
  own statistics would move it), with 6 of its 30 labels wrong on purpose: the probe's eval
  top-1 is the numpy solution's, which is exactly 24 / 30. Returning the train accuracy,
  standardising the eval split by its own statistics or an untrained probe gives another
  value; the former bound (acc > 0.95 on separable clusters) passed the first two."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 6)) * 2
  train_y = rng.integers(0, 3, 600)
  train_x = centres[train_y] + rng.normal(size=(600, 6))
  eval_class = np.repeat([0, 2], [27, 3])  # unlike the train split's mix
  eval_x = centres[eval_class] + 0.3 * rng.normal(size=(30, 6))
  eval_y = eval_class.copy()
  wrong = [0, 5, 10, 15, 20, 28]
  eval_y[wrong] = (eval_class[wrong] + 1) % 3
  reference = _numpy_probe(train_x, train_y, eval_x, 3)
  np.testing.assert_array_equal(reference, eval_class)  # every eval point far from a boundary
  expected = np.mean(reference == eval_y)
  assert expected == 24 / 30
  acc = probe.train_linear_probe(
      train_x, train_y, eval_x, eval_y, 3, steps=300, batch_size=64, lr=1e-2
  )
  assert acc == expected
  # Standardisation uses the train split's statistics for both splits.
  train_x, eval_x = rng.normal(3, 2, size=(50, 4)), rng.normal(-1, 5, size=(20, 4))
  std_train, std_eval = probe.standardise(train_x, eval_x)
  mean, std = train_x.mean(0), train_x.std(0)
  np.testing.assert_allclose(std_eval, (eval_x - mean) / std, rtol=1e-5)
  np.testing.assert_allclose(std_train.mean(0), 0, atol=1e-12)
  np.testing.assert_allclose(std_train.std(0), 1, rtol=1e-5)
