"""Trained runs: the one module that reads and writes them.

A run is a workdir written by `python -m vim_jax.main` (or by `write_run`, for importers and
tests): `config.json`, whose `trainer` names the kind of run, and orbax checkpoints under
`checkpoints/<step>/`. A trainer's checkpoint holds its whole train state (optimizer moments,
the discriminator, the EMA copy); consumers restore only the params they need, with orbax's
partial restore, so loading the SL tokenizer for stage 2 reads its 28M-param encoder and the
codebook, not 10 GB of train state. Params land on the shardings the caller gives (one sharding
for every leaf, or a tree of them), by default on this process's first device.

  load_tokenizer(workdir, with_decoder=True)  a stage-1 run's tokenizer (the EMA copy if kept)
  load_frozen_encoder(workdir, mesh, rules)   its encoder and codebook, sharded, for stage 2
  load_vim(workdir)                           a stage-2 run's VIM, and its tokenizer
  load_classifier(workdir)                    a classifier run (rejection sampling, accuracy)
  write_run(workdir, config, params, step)    a stage-1 or stage-2 run from params
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from vim_jax.infra import checkpoint, fileio, parallel
from vim_jax.models import classifier as classifier_lib
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import vim as vim_lib
from vim_jax.trainers import vim_step

# Trainer keys renamed since (old -> new): workdirs and configs written before say the old one.
RENAMED_TRAINERS = {"vitvq": "tokenizer"}
RUN_KINDS = {
    "tokenizer": "stage-1",
    "vim": "stage-2 (VIM)",
    "classifier": "classifier",
    "quickstart": "quickstart",
}
# What trains each kind of run, for error messages.
HOW_TO_TRAIN = {
    "tokenizer": "python -m vim_jax.main --config=configs/vitvq_base.py --workdir=...",
    "vim": "python -m vim_jax.main --config=configs/vim_base.py --workdir=...",
    "classifier": "python -m vim_jax.main --config=configs/classifier.py --workdir=...",
}


# Config fields added after runs had been saved without them, by kind of run, each with the value
# such runs behaved as. read_run_config fills them into an old run's config, so code reads every
# field directly and a setting's default lives in the config files alone. A field added to the
# config files gets an entry here when runs saved without it must still load.
_STACK_FIELDS_ADDED = {  # each Transformer stack section (transformer.StackConfig.from_config)
    "dropout": 0.0,
    "remat_policy": "none",  # runs that saved `remat` instead: see _renamed_remat
    "scan_layers": False,
    "attention": "auto",
    "attention_block": 512,
    "mlp_activation": "gelu",
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,
}
_STACK_SECTIONS = {"tokenizer": ("model.encoder", "model.decoder"), "vim": ("model",)}


def _stack_fields_added(trainer: str) -> dict:
  return {
      f"{section}.{field}": value
      for section in _STACK_SECTIONS[trainer]
      for field, value in _STACK_FIELDS_ADDED.items()
  }


_EVERY_RUN_FIELDS_ADDED = {
    "axis_rules": parallel.DEFAULT_AXIS_RULES,
    "mesh.dcn_data": 1,
    "mesh.dcn_fsdp": 1,
    "mesh.dcn_tensor": 1,
    "data.shapes_resolution": 0,
    "data.folder_eval_list": "",
}
_FID_FIELDS_ADDED = {  # runs without a fid section did not compute FID while training
    "fid.every": 0,
    "fid.inception_weights": "weights/pt_inception-2015-12-05.msgpack",
}
FIELDS_ADDED = {
    "tokenizer": {
        **_EVERY_RUN_FIELDS_ADDED,
        **_FID_FIELDS_ADDED,
        "dropout_rng": "auto",
        "grad_accum_steps": 1,
        "model.position_embedding": "learned",
        "model.output_ffn": True,
        "model.pixel_range": "minus_one_to_one",
        **_stack_fields_added("tokenizer"),
    },
    "vim": {
        **_EVERY_RUN_FIELDS_ADDED,
        **_FID_FIELDS_ADDED,
        "fid.reference_stats": "",
        "dropout_rng": "auto",
        "grad_accum_steps": 1,
        "label_dropout": 0.0,
        "model.condition_every_position": False,
        "model.loss_chunk": 256,
        "sampling.batch_size": 64,
        **_stack_fields_added("vim"),
    },
    "classifier": dict(_EVERY_RUN_FIELDS_ADDED),
}


def _renamed_remat(stack: ml_collections.ConfigDict) -> None:
  """Runs saved before remat_policy have remat=True/False, which meant 'full' / 'none'."""
  if "remat_policy" not in stack and "remat" in stack:
    stack.remat_policy = "full" if stack.remat else "none"
  if "remat" in stack:
    del stack["remat"]


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a run's, in place; returned) with each FIELDS_ADDED field it lacks set to the
  value runs saved before that field behaved as; fields it has are left as they are."""
  for section in _STACK_SECTIONS.get(config.get("trainer"), ()):
    stack = config
    for name in section.split("."):
      stack = stack.get(name) if stack is not None else None
    if stack is not None:  # a partial config (tests write some) has no stack to rename in
      _renamed_remat(stack)
  for key, value in FIELDS_ADDED.get(config.get("trainer"), {}).items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    if name not in node:
      node[name] = value
  return config


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------
def read_run_config(workdir: str, trainer: str | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict a run saved in workdir/config.json (local or gs://), with the fields added
  since it was saved filled in (FIELDS_ADDED); with `trainer`, checks the run's kind."""
  path = fileio.join(workdir, "config.json")
  if not fileio.exists(path):
    what = RUN_KINDS.get(trainer, "training")
    raise FileNotFoundError(
        f"no {what} run at {workdir!r} (missing config.json); point at a "
        "workdir written by `python -m vim_jax.main`."
    )
  config = ml_collections.ConfigDict(fileio.read_json(path))
  trainer = RENAMED_TRAINERS.get(trainer, trainer)
  if config.get("trainer") in RENAMED_TRAINERS:
    config.trainer = RENAMED_TRAINERS[config.trainer]
  if trainer is not None and config.get("trainer") != trainer:
    raise ValueError(
        f"{workdir!r} holds a {config.get('trainer')!r} run, not a "
        f"{RUN_KINDS.get(trainer, trainer)} ({trainer!r}) run."
    )
  return with_added_fields(config)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the run's finalized checkpoints (orbax's unfinished temporary folders and
  checkpoints/corrupt/ are not steps)."""
  folder = fileio.path(workdir) / "checkpoints"
  if not folder.exists():
    return []
  return sorted(
      int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "default").exists()
  )


def checkpoint_step(workdir: str, step: int | None, trainer: str) -> int:
  """`step`, checked to exist, or the run's latest checkpoint step."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint under {workdir}/checkpoints; train the "
        f"{RUN_KINDS[trainer]} run first ({HOW_TO_TRAIN[trainer]})."
    )
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has {steps}.")
  return int(step)


def _item_dir(workdir: str, step: int) -> str:
  return fileio.join(workdir, "checkpoints", str(step), "default")


def stored_fields(workdir: str, step: int) -> dict[str, bool]:
  """The checkpoint's top-level entries and whether each holds arrays (False for a None
  field, e.g. `ema_params` of a run without EMA)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(fileio.path(_item_dir(workdir, step)))
  return {name: value is not None for name, value in metadata.items()}


def _abstract(shapes, shardings):
  if shardings is None:  # this process's first device, also in multi-process jobs
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, shapes)
  return checkpoint.abstract_with_shardings(shapes, shardings)


def restore_params(workdir: str, step: int, field: str, shapes, shardings=None):
  """Restores checkpoint entry `field` (e.g. 'params'), only the leaves in `shapes` (a tree
  of ShapeDtypeStructs, possibly a subtree of what was saved), onto `shardings`."""
  item = {field: _abstract(shapes, shardings)}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        _item_dir(workdir, step),
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
  except Exception as e:  # orbax raises several types for a tree that does not match
    raise ValueError(
        f"the checkpoint at {workdir} step {step} does not match the model its "
        f"config.json describes ({field}): {type(e).__name__}: {e}"
    ) from e
  return restored[field]


def _param_shapes(model: nn.Module, *example_inputs) -> Any:
  return nn.meta.unbox(
      jax.eval_shape(lambda rng: model.init(rng, *example_inputs), jax.random.key(0))
  )["params"]


@dataclasses.dataclass
class Tokenizer:
  """A trained stage-1 tokenizer, frozen."""

  model: tokenizer_lib.ViTVQGAN
  params: dict  # the EMA copy when the run kept one; without 'decoder' if loaded without it
  config: ml_collections.ConfigDict  # the stage-1 run's config
  step: int

  @property
  def grid(self) -> tuple[int, int]:
    return self.model.grid

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def has_decoder(self) -> bool:
    return "decoder" in self.params


def tokenizer_param_shapes(model: tokenizer_lib.ViTVQGAN) -> dict:
  return _param_shapes(model, jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32))


def load_tokenizer(
    workdir: str,
    step: int | None = None,
    shardings=None,
    with_decoder: bool = True,
    with_encoder: bool = True,
) -> Tokenizer:
  """A stage-1 run's tokenizer params (the EMA copy when the run kept one), latest checkpoint
  by default. with_decoder=False skips the decoder: enough to tokenize (pretokenize, the probe),
  not to decode; with_encoder=False skips the encoder: enough to decode tokens (sampling).
  shardings: one sharding, or a tree of them matching the loaded params."""
  config = read_run_config(workdir, "tokenizer")
  step = checkpoint_step(workdir, step, "tokenizer")
  model = tokenizer_lib.ViTVQGAN.from_config(config)
  shapes = tokenizer_param_shapes(model)
  skipped = {
      name for name, wanted in (("decoder", with_decoder), ("encoder", with_encoder)) if not wanted
  }
  shapes = {k: v for k, v in shapes.items() if k not in skipped}
  field = "ema_params" if stored_fields(workdir, step).get("ema_params") else "params"
  params = restore_params(workdir, step, field, shapes, shardings)
  return Tokenizer(model, params, config, step)


# Encoder params that the model computes in float32 whatever its dtype (the projection to the
# code); the quantizer's codebook is float32 as well.
FLOAT32_ENCODER_PARAMS = ("to_code",)


def frozen_encoder_shapes(model: tokenizer_lib.ViTVQGAN, mesh, rules) -> dict:
  """ShapeDtypeStructs (with shardings) of what stage 2 holds of a tokenizer: 'encoder' and
  'quantizer', sharded over `mesh` by the logical axis rules like any params, the encoder's
  weight matrices in the compute dtype (see frozen_encoder_params)."""
  image = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  rng = jax.random.key(0)  # outside the mesh: an eager op on compile-only devices fails
  with parallel.tracing_context(mesh, rules):
    boxed = jax.eval_shape(lambda r: model.init(r, image), rng)["params"]
  boxed = {k: v for k, v in boxed.items() if k != "decoder"}
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  shapes = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  return frozen_encoder_params(model, shapes)


def frozen_encoder_params(model: tokenizer_lib.ViTVQGAN, params: dict) -> dict:
  """params ('encoder', 'quantizer'; arrays or ShapeDtypeStructs) with the encoder's weight
  matrices (kernels and the position embedding: the bulk) in the model's compute dtype: the
  model casts them to it anyway, so the tokens are the same. Biases, LayerNorm params (which
  LayerNorm applies in float32) and the projection to the code stay float32."""

  def compute_dtype(path, x):
    names = [str(getattr(p, "key", "")) for p in path]
    matrix = names[-1] == "kernel" or names[-1].endswith(("_kernel", "_embedding"))
    if not matrix or any(n in FLOAT32_ENCODER_PARAMS for n in names):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, model.dtype, sharding=x.sharding)
    return x.astype(model.dtype)

  encoder = jax.tree_util.tree_map_with_path(compute_dtype, params["encoder"])
  return {**params, "encoder": encoder}


def load_frozen_encoder(workdir: str, mesh, rules) -> Tokenizer:
  """What stage 2's train step needs of a tokenizer, and only that: the encoder and the
  quantizer (the EMA copy when the run kept one), laid out as frozen_encoder_shapes says.
  Decoding needs load_tokenizer(workdir, with_encoder=False)."""
  config = read_run_config(workdir, "tokenizer")
  model = tokenizer_lib.ViTVQGAN.from_config(config)
  shapes = frozen_encoder_shapes(model, mesh, rules)
  tok = load_tokenizer(
      workdir, shardings=jax.tree.map(lambda x: x.sharding, shapes), with_decoder=False
  )
  return dataclasses.replace(tok, params=frozen_encoder_params(model, tok.params))


@dataclasses.dataclass
class TrainedVIM:
  """A trained stage-2 model and the tokenizer it models."""

  model: vim_lib.VIM
  params: Any
  tokenizer: Tokenizer
  config: ml_collections.ConfigDict
  step: int


def vim_param_shapes(model: vim_lib.VIM) -> dict:
  return _param_shapes(
      model, jnp.zeros((1, model.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)
  )


def load_vim(
    workdir: str,
    step: int | None = None,
    shardings=None,
    tokenizer_shardings=None,
    with_decoder: bool = True,
) -> TrainedVIM:
  """A stage-2 run's VIM params (latest checkpoint by default) and its tokenizer."""
  config = read_run_config(workdir, "vim")
  step = checkpoint_step(workdir, step, "vim")
  tok = load_tokenizer(
      config.tokenizer_workdir, shardings=tokenizer_shardings, with_decoder=with_decoder
  )
  model = vim_step.build_model(config, tok.model)
  params = restore_params(workdir, step, "params", vim_param_shapes(model), shardings)
  return TrainedVIM(model, params, tok, config, step)


def load_classifier(workdir: str, shardings=None) -> tuple[classifier_lib.ConvClassifier, Any]:
  """(model, params) of a classifier run's latest checkpoint."""
  config = read_run_config(workdir, "classifier")
  path = fileio.join(workdir, "num_classes.json")
  if not fileio.exists(path):
    raise FileNotFoundError(
        f"{workdir} has no finished classifier run (missing "
        "num_classes.json); train one with configs/classifier.py."
    )
  model = classifier_lib.ConvClassifier.from_config(config, fileio.read_json(path)["num_classes"])
  step = checkpoint_step(workdir, None, "classifier")
  shapes = _param_shapes(model, jnp.zeros((1, config.image_size, config.image_size, 3)))
  return model, restore_params(workdir, step, "params", shapes, shardings)


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------
def _check_params(params, expected, what: str):
  """Raises ValueError naming every missing, unexpected or misshapen leaf (a whole missing or
  unexpected top-level subtree is named once)."""
  got = {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in _flatten(params).items()}
  want = {"/".join(map(str, k)): tuple(v.shape) for k, v in _flatten(expected).items()}

  def grouped(keys, other, label, shapes):
    lines, done = [], set()
    for key in sorted(keys):
      top = key.split("/")[0]
      if top in done:
        continue
      if not any(k.split("/")[0] == top for k in other):  # the whole subtree
        done.add(top)
        count = sum(k.split("/")[0] == top for k in keys)
        lines.append(
            f"{label} {top}/* ({count} arrays)" if "/" in key else f"{label} {key} {shapes[key]}"
        )
      else:
        lines.append(f"{label} {key} {shapes[key]}")
    return lines

  problems = grouped(set(got) - set(want), want, "unexpected", got)
  problems += [
      f"{k}: shape {got[k]}, the config's model has {want[k]}"
      for k in sorted(set(got) & set(want))
      if got[k] != want[k]
  ]
  problems += grouped(set(want) - set(got), got, "missing", want)
  if problems:
    raise ValueError(
        f"params do not fit the {what} the config describes:\n  "
        + "\n  ".join(problems[:20])
        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    )


def _flatten(tree) -> dict:
  return traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {}


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """workdir/config.json (process 0), with local paths made absolute: commands that read the
  run later (evaluate, sample, a stage-2 run's tokenizer) may start in another folder."""
  if jax.process_index() == 0:
    fileio.write_text(
        fileio.join(workdir, "config.json"),
        fileio.with_absolute_paths(config).to_json_best_effort(indent=2),
    )


def write_run(workdir: str, config: ml_collections.ConfigDict, params, step: int = 0) -> None:
  """Writes a stage-1 (config.trainer 'tokenizer') or stage-2 ('vim') run that every consumer of
  runs accepts: config.json and a checkpoint at `step` holding {'step', 'params'}. For
  importers of published weights and for tests; a trainer cannot resume from it (it holds no
  optimizer state). params are checked against the model the config describes."""
  if config.get("trainer") == "tokenizer":
    _check_params(
        params, tokenizer_param_shapes(tokenizer_lib.ViTVQGAN.from_config(config)), "tokenizer"
    )
  elif config.get("trainer") == "vim":
    tok = load_tokenizer(config.tokenizer_workdir, with_decoder=False)
    _check_params(params, vim_param_shapes(vim_step.build_model(config, tok.model)), "VIM")
  else:
    raise ValueError(
        f"config.trainer={config.get('trainer')!r}; write_run writes 'tokenizer' "
        "(stage 1) or 'vim' (stage 2) runs."
    )
  write_config(workdir, config)
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), async_save=False)
  try:
    ckpt.save(
        step,
        {"step": np.asarray(step, np.int32), "params": jax.tree.map(np.asarray, params)},
        force=True,
    )
  finally:
    ckpt.close()
