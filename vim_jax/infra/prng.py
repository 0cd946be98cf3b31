"""The PRNG the train steps draw dropout from (`config.dropout_rng`), and the libtpu flag it needs.

jax's default PRNG, threefry, is a hash computed with 32-bit integer ops: on a TPU it costs
vector-unit time in proportion to the bits drawn, and under the `minimal` remat policy every
dropout mask is drawn twice (the backward pass recomputes it). The `rbg` family draws the bits
with XLA's RngBitGenerator, which a TPU runs in hardware (MaxText trains with it):

  threefry    jax.random's default: the same bits on every backend and every sharding.
  rbg         RngBitGenerator for the bits, threefry for split / fold_in (so keys derived per
              step and per microbatch are as independent as threefry's).
  unsafe_rbg  RngBitGenerator for the bits and for split / fold_in (cheaper key derivation whose
              independence jax has not tested).
  auto        rbg on TPU, threefry elsewhere (a GPU or CPU gains nothing from RngBitGenerator).

Only dropout (stage 2: also its label dropout) uses this key. Parameter-init keys stay threefry,
so a seed gives the same initial params on every backend; checkpoints hold no key, so a run can
resume under another setting (its masks then change from the resumed step on).

rbg bits differ between backends, and, with the libtpu flag below, between mesh layouts: a run
is reproduced exactly by the same command on the same slice (and resumed exactly there), not on
another backend or layout.
"""

from __future__ import annotations

import os

import jax

DROPOUT_RNGS = ("auto", "threefry", "rbg", "unsafe_rbg")
_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}

# Without it, XLA's SPMD partitioner generates a sharded RngBitGenerator's whole (global) output
# on every chip and keeps its slice: rbg's masks would cost a chip as much as the whole batch's.
# With it each chip draws only its shard (jax.random's docs list it for rbg's generation and for
# unsafe_rbg; MaxText sets it in LIBTPU_INIT_ARGS). Only libtpu reads LIBTPU_INIT_ARGS, so it is
# harmless on CPU and GPU, and it touches RngBitGenerator alone (threefry programs are unchanged).
TPU_FLAG = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"


def check_setting(value) -> None:
  """Raises ValueError unless `value` is one of DROPOUT_RNGS."""
  if value not in DROPOUT_RNGS:
    raise ValueError(
        f"config.dropout_rng={value!r} is not a dropout PRNG; expected one of "
        f"{', '.join(DROPOUT_RNGS)} (auto: rbg on TPU, threefry elsewhere); pass "
        "e.g. --config.dropout_rng=auto."
    )


def impl_for(setting: str, platform: str) -> str:
  """The jax.random implementation name ('threefry2x32', 'rbg' or 'unsafe_rbg') that `setting`
  (one of DROPOUT_RNGS) gives on `platform` ('tpu', 'gpu', 'cpu', ...)."""
  check_setting(setting)
  if setting == "auto":
    setting = "rbg" if platform == "tpu" else "threefry"
  return _IMPLS[setting]


def current_platform() -> str:
  """The platform the function being traced will run on: the devices of the mesh set with
  jax.set_mesh (parallel.tracing_context), which may be a TPU slice compiled for on a CPU host
  (compile_report), else the default backend's (a plain jit runs there)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.devices()[0].platform


def dropout_key(config, platform: str | None = None) -> jax.Array:
  """A scalar typed key for config.seed in the implementation config.dropout_rng asks for on
  `platform` (default: current_platform(), so call it where the step is traced). The steps fold
  the step number (and the microbatch index) into it."""
  impl = impl_for(config.dropout_rng, platform or current_platform())
  return jax.random.key(config.seed, impl=impl)


def _settings(config) -> list[str]:
  """config.dropout_rng of a config and of its stages (the quickstart holds one per stage), where
  set: configs without it (the classifier's) draw no dropout."""
  found = [config.dropout_rng] if "dropout_rng" in config else []
  for stage in ("stage1", "stage2", "classifier"):
    sub = config.get(stage)
    if hasattr(sub, "keys"):
      found += _settings(sub)
  return found


def configure_libtpu(config, environ=os.environ) -> bool:
  """Appends TPU_FLAG to environ['LIBTPU_INIT_ARGS'] when a stage of `config` may draw dropout
  from RngBitGenerator on a TPU (config.dropout_rng other than 'threefry'); a value of the flag
  already there is left as it is.

  libtpu reads the variable once, when jax's TPU backend starts: call this before anything asks
  jax for devices (vim_jax/main.py does). Returns whether the flag is named in the variable."""
  if all(setting == "threefry" for setting in _settings(config)):
    return False
  name_libtpu_flag(environ)
  return True


def name_libtpu_flag(environ=os.environ) -> None:
  """Appends TPU_FLAG to environ['LIBTPU_INIT_ARGS'] unless the flag is named there already.
  tpu_slices does it for every compile-only slice, so that the compile report sizes rbg's
  masks per chip, as main's runs have them (the flag changes no other program)."""
  args = environ.get("LIBTPU_INIT_ARGS", "")
  if TPU_FLAG.split("=")[0] not in args:
    environ["LIBTPU_INIT_ARGS"] = f"{args} {TPU_FLAG}".strip()
