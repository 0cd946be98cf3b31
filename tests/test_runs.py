"""vim_jax/infra/runs.py: params-only restores equal full train-state restores; written runs load.

The "old path" below is how runs were loaded before infra/runs.py (tokenizer.py,
vim_trainer.load_vim, classifier_trainer.load_classifier): rebuild the whole train state, optimizers
and discriminator included, and restore all of it. The fixture runs are written by the trainers,
whose checkpoint layout infra/runs.py must keep reading.
"""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.infra import checkpoint, fileio, parallel, runs
from vim_jax.models import classifier as classifier_lib
from vim_jax.trainers import tokenizer_step, vim_step


def _full_restore(workdir, init_fn):
  shapes = nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"))
  try:
    return ckpt.restore(
        ckpt.latest_step(),
        checkpoint.abstract_with_shardings(shapes, jax.tree.map(lambda _: device, shapes)),
    )
  finally:
    ckpt.close()


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tokenizer_params_equal_the_full_train_state_restore(tokenizer_dir):
  config = runs.read_run_config(tokenizer_dir, "vitvq")
  models = tokenizer_step.build_models(config)
  tx, _, disc_tx = tokenizer_step.build_optimizers(config)
  full = _full_restore(tokenizer_dir, tokenizer_step.make_init_fn(models, tx, disc_tx, config, 1))
  tok = runs.load_tokenizer(tokenizer_dir)
  assert tok.step == 4 and tok.has_decoder
  _assert_trees_equal(tok.params, full.params)
  lean = runs.load_tokenizer(tokenizer_dir, with_decoder=False)
  assert sorted(lean.params) == ["encoder", "quantizer"] and not lean.has_decoder
  _assert_trees_equal(lean.params, {k: v for k, v in full.params.items() if k != "decoder"})


def test_vim_and_classifier_params_equal_the_full_restore(vim_dir, classifier_dir):
  trained = runs.load_vim(vim_dir)
  tx, _ = vim_step.build_optimizer(trained.config)

  def vim_init(rng):
    params = trained.model.init(
        rng, jnp.zeros((1, trained.model.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)
    )["params"]
    return vim_step.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  _assert_trees_equal(trained.params, _full_restore(vim_dir, vim_init).params)
  assert trained.step == 3 and trained.tokenizer.step == 4

  model, params = runs.load_classifier(classifier_dir)
  config = runs.read_run_config(classifier_dir, "classifier")
  from vim_jax.trainers import classifier as classifier_trainer

  full = _full_restore(
      classifier_dir,
      classifier_trainer.make_init_fn(
          model, classifier_trainer.build_optimizer(config), config.image_size
      ),
  )
  assert isinstance(model, classifier_lib.ConvClassifier)
  _assert_trees_equal(params, full.params)


def test_written_runs_load_and_the_ema_copy_wins(tokenizer_dir, tmp_path):
  config = runs.read_run_config(tokenizer_dir, "vitvq")
  params = jax.tree.map(np.asarray, runs.load_tokenizer(tokenizer_dir).params)
  written = str(tmp_path / "imported")
  runs.write_run(written, config, params, step=7)
  tok = runs.load_tokenizer(written)
  assert tok.step == 7
  _assert_trees_equal(tok.params, params)

  # A run that kept an EMA copy: consumers get the EMA params.
  ema_run = str(tmp_path / "ema")
  fileio.write_text(fileio.join(ema_run, "config.json"), config.to_json_best_effort())
  ema = jax.tree.map(lambda x: x + 1.0, params)
  ckpt = checkpoint.Checkpointer(fileio.join(ema_run, "checkpoints"), async_save=False)
  ckpt.save(2, {"step": np.int32(2), "params": params, "ema_params": ema}, force=True)
  ckpt.close()
  _assert_trees_equal(runs.load_tokenizer(ema_run).params, ema)

  # A stage-2 run written on top of it.
  vim_config = stage2_config(written)
  model = vim_step.build_model(vim_config, tok.model)
  vim_params = jax.tree.map(
      np.asarray,
      nn.meta.unbox(
          model.init(
              jax.random.key(1),
              jnp.zeros((1, model.num_tokens), jnp.int32),
              jnp.zeros((1,), jnp.int32),
          )["params"]
      ),
  )
  vim_run = str(tmp_path / "vim")
  runs.write_run(vim_run, vim_config, vim_params)
  _assert_trees_equal(runs.load_vim(vim_run).params, vim_params)


def test_runs_read_and_write_through_relative_paths(tokenizer_dir, tmp_path, monkeypatch):
  """What a user's shell passes (`--workdir=workdirs/x`): orbax refuses relative paths, so the
  path layer makes them absolute; a stage-2 run written with a relative tokenizer_workdir
  records it absolute and loads from any folder."""
  monkeypatch.chdir(tmp_path)
  shutil.copytree(tokenizer_dir, "workdirs/tok")
  tok = runs.load_tokenizer("workdirs/tok")  # orbax metadata and partial restore
  _assert_trees_equal(tok.params, runs.load_tokenizer(tokenizer_dir).params)
  assert runs.stored_fields("workdirs/tok", 4)["params"]
  model = vim_step.build_model(stage2_config("workdirs/tok"), tok.model)
  vim_params = jax.tree.map(
      np.asarray,
      nn.meta.unbox(
          model.init(
              jax.random.key(1),
              jnp.zeros((1, model.num_tokens), jnp.int32),
              jnp.zeros((1,), jnp.int32),
          )["params"]
      ),
  )
  runs.write_run("workdirs/vim", stage2_config("workdirs/tok"), vim_params, step=3)
  assert runs.read_run_config("workdirs/vim").tokenizer_workdir == str(tmp_path / "workdirs/tok")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  _assert_trees_equal(runs.load_vim(str(tmp_path / "workdirs/vim")).params, vim_params)


def stage2_config(tokenizer_workdir):
  from configs import vim_base

  config = vim_base.get_config("tiny")
  config.tokenizer_workdir = tokenizer_workdir
  return config


def test_write_run_names_every_mismatch(tokenizer_dir, tmp_path):
  config = runs.read_run_config(tokenizer_dir, "vitvq")
  params = jax.tree.map(np.asarray, runs.load_tokenizer(tokenizer_dir).params)
  broken = {**params, "extra": {"kernel": np.zeros(3)}}
  broken["quantizer"] = {**params["quantizer"], "codebook": np.zeros((7, 3), np.float32)}
  del broken["decoder"]
  with pytest.raises(ValueError) as error:
    runs.write_run(str(tmp_path / "x"), config, broken)
  message = str(error.value)
  assert "unexpected extra/* (1 arrays)" in message
  assert "quantizer/codebook: shape (7, 3), the config's model has" in message
  assert "missing decoder/* (" in message
  assert not fileio.exists(str(tmp_path / "x" / "config.json"))  # nothing half-written
  classifier_config = config.copy_and_resolve_references()
  classifier_config.trainer = "classifier"
  with pytest.raises(ValueError, match="writes 'tokenizer'"):
    runs.write_run(str(tmp_path / "y"), classifier_config, params)


def test_errors_name_the_workdir_and_the_fix(tokenizer_dir, vim_dir, tmp_path):
  with pytest.raises(ValueError, match="holds a 'vim' run, not a stage-1"):
    runs.load_tokenizer(vim_dir)
  with pytest.raises(FileNotFoundError, match="missing config.json"):
    runs.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 99; it has"):
    runs.load_tokenizer(tokenizer_dir, step=99)
  empty = str(tmp_path / "empty")
  fileio.write_text(
      fileio.join(empty, "config.json"), runs.read_run_config(tokenizer_dir).to_json_best_effort()
  )
  with pytest.raises(FileNotFoundError, match="no checkpoint under .*python -m vim_jax.main"):
    runs.load_tokenizer(empty)


def test_params_land_on_the_given_shardings(tokenizer_dir):
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  replicated = NamedSharding(mesh, P())
  tok = runs.load_tokenizer(tokenizer_dir, shardings=replicated)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(tok.params))
  assert len(jax.tree.leaves(tok.params)[0].sharding.device_set) == jax.device_count()


def test_frozen_encoder_is_sharded_in_the_compute_dtype_and_tokenizes_identically(tmp_path):
  """Stage 2's lean tokenizer: encoder and codebook only (no decoder), sharded by the logical
  rules over an FSDP mesh, the encoder's weights in bfloat16 except the float32 projection to
  the code; its tokens equal the full float32-stored params' on the same bfloat16 model."""
  from configs import vitvq_base
  from vim_jax.models import tokenizer as tokenizer_lib

  config = vitvq_base.get_config("tiny")
  config.model.dtype = "bfloat16"
  model = tokenizer_lib.ViTVQGAN.from_config(config)
  images = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(model.init(jax.random.key(0), images[:1]))["params"]
  # Trained-looking values: LayerNorm scales of 1 and zero biases survive a bfloat16 cast.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(
      treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )
  runs.write_run(str(tmp_path / "tok"), config, params)
  mesh = parallel.create_mesh(dict(data=1, fsdp=8, tensor=1))
  lean = runs.load_frozen_encoder(str(tmp_path / "tok"), mesh, parallel.DEFAULT_AXIS_RULES)
  assert set(lean.params) == {"encoder", "quantizer"}
  dtypes = {
      "/".join(str(k.key) for k in path): leaf.dtype
      for path, leaf in jax.tree_util.tree_flatten_with_path(lean.params)[0]
  }
  matrices = {
      k
      for k in dtypes
      if k.startswith("encoder/") and "to_code" not in k and k.endswith(("kernel", "_embedding"))
  }
  assert len(matrices) == 10 and {dtypes[k] for k in matrices} == {jnp.dtype("bfloat16")}
  # LayerNorm runs in float32, also for the stacked [layers, D] params of a scanned stack.
  assert {dtypes[k] for k in dtypes if "/ln_" in k or k.endswith("bias")} == {jnp.dtype("float32")}
  assert dtypes["encoder/to_code/kernel"] == dtypes["quantizer/codebook"] == jnp.float32
  fc1 = lean.params["encoder"]["transformer"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P(None, "fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape[1] == fc1.shape[1] // 8
  encode = jax.jit(
      lambda p, x: model.apply({"params": p}, x, method=tokenizer_lib.ViTVQGAN.encode_to_indices)
  )
  # Against the float32-stored params on the same shardings (an FSDP-split contraction sums in
  # another order than one device does, which can flip a near-tie between two codes).
  full = jax.tree.map(
      lambda p, l: jax.device_put(p, l.sharding), {k: params[k] for k in lean.params}, lean.params
  )
  np.testing.assert_array_equal(encode(lean.params, images), encode(full, images))


def _set(config, key: str, value):
  *parents, name = key.split(".")
  for parent in parents:
    config = config[parent]
  config[name] = value


def _configs_of_each_kind():
  from configs import classifier, vim_base, vitvq_base

  return {
      "tokenizer": vitvq_base.get_config("tiny"),
      "vim": vim_base.get_config("tiny"),
      "classifier": classifier.get_config(),
  }


def _json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def test_a_run_saved_before_the_added_fields_reads_back_with_their_former_values(tmp_path):
  """A config.json without any FIELDS_ADDED field (and with a stack's former `remat`) reads back
  as the config that sets each to the table's value, and builds the same models."""
  from vim_jax.infra import prng
  from vim_jax.models import tokenizer as tokenizer_lib
  from vim_jax.models import vim as vim_lib

  read = {}
  for trainer, explicit in _configs_of_each_kind().items():
    for key, value in runs.FIELDS_ADDED[trainer].items():
      _set(explicit, key, value)
    saved = _json(explicit)
    for key in runs.FIELDS_ADDED[trainer]:
      *parents, name = key.split(".")
      section = saved
      for parent in parents:
        section = section[parent]
      del section[name]
    if trainer == "tokenizer":
      saved["model"]["encoder"]["remat"] = True  # what remat_policy='full' was saved as
      explicit.model.encoder.remat_policy = "full"
    workdir = tmp_path / trainer
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(saved))
    read[trainer] = runs.read_run_config(str(workdir), trainer)
    assert _json(read[trainer]) == _json(explicit), trainer
    assert parallel.axis_rules(read[trainer]) == parallel.axis_rules(explicit)
    parallel.create_mesh(read[trainer].mesh)
    if trainer != "classifier":
      prng.dropout_key(read[trainer], "cpu")

    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    if trainer == "tokenizer":
      old, new = (tokenizer_lib.ViTVQGAN.from_config(c) for c in (read[trainer], explicit))
      assert old.encoder_stack.remat_policy == "full" and not old.encoder_stack.scan_layers
      assert (old.position_embedding, old.output_ffn, old.pixel_range) == (
          "learned",
          True,
          "minus_one_to_one",
      )
      assert shapes(runs.tokenizer_param_shapes(old)) == shapes(runs.tokenizer_param_shapes(new))
    elif trainer == "vim":
      old, new = (vim_lib.VIM.from_config(c, 256, 64) for c in (read[trainer], explicit))
      assert (old.condition_every_position, old.loss_chunk) == (False, 256)
      assert vim_step.sampling_batch_size(read[trainer], 1, with_guidance=False) == 64
      assert shapes(runs.vim_param_shapes(old)) == shapes(runs.vim_param_shapes(new))
    else:
      continue
    for field in dataclasses.fields(old):
      if field.name not in ("parent", "name"):
        assert getattr(old, field.name) == getattr(new, field.name), (trainer, field.name)


def test_a_complete_config_reads_back_unchanged(tmp_path):
  """The reader adds nothing to a run saved with today's config; each FIELDS_ADDED field is a
  field of today's config of its kind."""
  for trainer, config in _configs_of_each_kind().items():
    flat = {".".join(k) for k in traverse_util.flatten_dict(_json(config))}
    assert set(runs.FIELDS_ADDED[trainer]) <= flat, set(runs.FIELDS_ADDED[trainer]) - flat
    workdir = str(tmp_path / trainer)
    runs.write_config(workdir, config)
    with open(f"{workdir}/config.json") as f:
      saved = json.load(f)
    assert _json(runs.read_run_config(workdir, trainer)) == saved
