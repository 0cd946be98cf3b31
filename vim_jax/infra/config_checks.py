"""Refuses bad periods, sizes and counts in a config at start, before anything compiles.

Unchecked, a period of 0 surfaces minutes later as `ZeroDivisionError` at
`step % config.eval_every`, and a batch size of 0 as a shape error inside the compiler.
`check(config)` names every bad field with its value, what it must be and how to fix it. The
quickstart's config holds one config per stage; each is checked too (a typo in stage 2 must not
wait for stage 1 to train).
"""

from __future__ import annotations

from typing import Callable

from vim_jax.infra.prng import DROPOUT_RNGS

# Fields that must be whole numbers >= 1, wherever they appear in a config.
POSITIVE = (
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "batch_size",
    "eval_batch_size",
    "keep_checkpoints",
    "grad_accum_steps",
    "num_grid_images",
    "num_samples",
    "fid.num_images",
    "fid.batch_size",
    "probe.steps",
    "probe.batch_size",
    "sampling.batch_size",
)
# Counts of images where -1 means "the whole split".
COUNT_OR_ALL = ("num_eval_images", "probe.num_train_images", "probe.num_eval_images")
# Periods where 0 turns the feature off.
PERIOD_OR_OFF = ("fid.every",)

# Fields with a range, and what the range means.
_RANGES = (
    (
        "acceptance",
        lambda v: 0 < v <= 1,
        "in (0, 1] (the share of samples rejection sampling keeps; the paper's is 0.5)",
    ),
    (
        "label_dropout",
        lambda v: 0 <= v < 1,
        "in [0, 1) (the share of labels replaced by the null class)",
    ),
    ("sampling.temperature", lambda v: v >= 0, ">= 0 (0 = greedy, 1 = the model's distribution)"),
    ("sampling.top_k", lambda v: _is_int(v) and v >= 0, "a whole number >= 0 (0 = off)"),
    ("sampling.top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    (
        "dropout_rng",
        lambda v: v in DROPOUT_RNGS,
        f"one of {', '.join(DROPOUT_RNGS)} (the dropout "
        "PRNG; auto, the default, is rbg on TPU and threefry elsewhere)",
    ),
)

_HINTS = {
    "eval_every": "to evaluate only at the end, set it to total_steps",
    "checkpoint_every": "to save only at the end (and on SIGTERM), set it to total_steps",
    "log_every": "to log rarely, set it to total_steps",
    "num_grid_images": "the image grids need at least one image",
}


class ConfigValueError(ValueError):
  """A config field holds a value the run cannot use."""


def _lookup(config, dotted: str):
  node = config
  for key in dotted.split("."):
    if not hasattr(node, "keys") or key not in node.keys():
      return None
    node = node[key]
  return node


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _problems(config, prefix: str) -> list[str]:
  rules: list[tuple[tuple[str, ...], Callable[[object], bool], str]] = [
      (POSITIVE, lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
      (
          COUNT_OR_ALL,
          lambda v: _is_int(v) and (v >= 1 or v == -1),
          "a whole number >= 1, or -1 for the whole split",
      ),
      (PERIOD_OR_OFF, lambda v: _is_int(v) and v >= 0, "a whole number of steps >= 1, or 0 (off)"),
  ]
  problems = []
  for fields, valid, expected in rules:
    for field in fields:
      value = _lookup(config, field)
      if value is None or valid(value):
        continue
      hint = _HINTS.get(field)
      problems.append(
          f"config.{prefix}{field}={value!r} must be {expected}"
          + (f" ({hint})" if hint else "")
          + f": pass --config.{prefix}{field}=N."
      )
  for field, valid, expected in _RANGES:
    value = _lookup(config, field)
    if value is not None and not valid(value):
      problems.append(f"config.{prefix}{field}={value!r} must be {expected}.")
  for stage in ("stage1", "classifier", "stage2"):  # the quickstart's per-stage configs
    sub = _lookup(config, stage)
    if hasattr(sub, "keys"):
      problems += _problems(sub, f"{prefix}{stage}.")
  return problems


def check(config) -> None:
  """Raises ConfigValueError listing every bad field of `config` (and of its stages)."""
  problems = _problems(config, "")
  if problems:
    raise ConfigValueError("bad config values:\n  " + "\n  ".join(problems))
