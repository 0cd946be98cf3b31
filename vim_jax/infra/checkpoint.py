"""Orbax checkpointing of train states: async periodic saves, keep-N, exact resume.

Orbax writes each step to a temporary directory and renames it when complete, so a crash or
kill mid-save never leaves a half-written checkpoint in place of the last good one (leftover
temporary directories are removed at start). A finalized checkpoint that still fails to
restore (a damaged disk, files deleted by hand) is moved aside to `<directory>/corrupt/<step>`
with a warning, and the previous one is used. When every checkpoint fails, the run stops with
an error naming the folder instead of starting again from step 0. A checkpoint whose tree
differs from the state the config builds (another model size, or the other `scan_layers`
layout) is a config mismatch, not corruption: the run stops naming the differing arrays, and
the checkpoint stays where it is.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vim_jax.infra import fileio

log = logging.getLogger(__name__)


class NoUsableCheckpointError(RuntimeError):
  """A run saved checkpoints before, and none of them restores."""


class CheckpointLayoutError(ValueError):
  """A checkpoint holds a different tree of arrays than the config's train state."""


def _entry_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def key_paths(tree) -> set[str]:
  """'params/encoder/...' for every array leaf of a pytree (None fields have none)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_entry_name(e) for e in path) for path, _ in leaves}


def leaf_shapes(tree) -> dict[str, tuple]:
  """{key path: shape} of a pytree of arrays, ShapeDtypeStructs or orbax array metadata."""
  return {
      "/".join(_entry_name(e) for e in path): tuple(getattr(leaf, "shape", ()))
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def describe_layout_mismatch(
    saved: dict[str, tuple], wanted: dict[str, tuple], where: str
) -> str | None:
  """None when the two {key path: shape} maps agree, else an explanation naming the
  difference (and `scan_layers` when one side has scanned blocks and the other unrolled)."""
  params_first = lambda key: (not key.startswith("params/"), key)
  only_saved = sorted(set(saved) - set(wanted), key=params_first)
  only_wanted = sorted(set(wanted) - set(saved), key=params_first)
  reshaped = sorted(
      (k for k in set(saved) & set(wanted) if saved[k] != wanted[k]), key=params_first
  )
  if not only_saved and not only_wanted and not reshaped:
    return None
  lines = [f"{where} holds different arrays than the model this config builds."]
  if reshaped:
    lines.append(
        f"  other shapes ({len(reshaped)}): "
        + ", ".join(f"{k} {saved[k]} saved, {wanted[k]} wanted" for k in reshaped[:3])
        + (", ..." if len(reshaped) > 3 else "")
    )
  for label, keys in (
      ("only in the checkpoint", only_saved),
      ("only in the config's model", only_wanted),
  ):
    if keys:
      lines.append(
          f"  {label} ({len(keys)}): " + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
      )
  scanned = lambda keys: any("/layers/" in k for k in keys)
  unrolled = lambda keys: any("/block_" in k for k in keys)
  if (scanned(only_saved) and unrolled(only_wanted)) or (
      unrolled(only_saved) and scanned(only_wanted)
  ):
    was = "scanned (scan_layers=True)" if scanned(only_saved) else "unrolled (scan_layers=False)"
    lines.append(
        f"  The checkpoint's Transformer blocks are {was}; the two layouts do not "
        "load into each other. Set the model's scan_layers to match the run that "
        "saved it (model.scan_layers, or model.encoder/decoder.scan_layers)."
    )
  else:
    lines.append("  Use the config the run was trained with (its config.json), or a new workdir.")
  return "\n".join(lines)


class Checkpointer:
  """Saves and restores a train-state pytree under `directory` (a local or gs:// path)."""

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = fileio.absolute(directory)  # orbax refuses relative paths
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; returns whether one was started."""
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state):
    """Restores `step` into arrays shaped and sharded as `abstract_state` (a pytree of
    jax.ShapeDtypeStruct with shardings)."""
    log.info("checkpoint: restoring step %d from %s", step, self.directory)
    if dataclasses.is_dataclass(abstract_state):
      # A field the checkpoint does not hold and the state leaves None (a GAN field of a
      # VIM or classifier state, saved before the trainers shared one TrainState) is left out
      # of the target: orbax matches the target's entries to the saved ones by name.
      stored = self.stored_names(step)
      fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
      target = {k: v for k, v in fields.items() if k in stored or v is not None}
      if len(target) < len(fields):
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return abstract_state.replace(**restored)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def stored_names(self, step: int) -> set[str]:
    """The top-level entries of the state saved at `step` (None fields included)."""
    item = fileio.path(fileio.join(self.directory, str(step), "default"))
    return set(ocp.PyTreeCheckpointHandler().metadata(item).keys())

  def restore_latest(self, abstract_state):
    """(state, step) from the newest checkpoint that restores, or (None, None) when the run
    has never saved one. Checkpoints that fail are moved to <directory>/corrupt/ with a warning
    naming them. When none restores, this raises rather than silently training from step 0."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      self._check_layout(step, abstract_state)
      try:
        return self.restore(step, abstract_state), step
      except Exception as e:  # pylint: disable=broad-except; any failure means unusable
        log.warning(
            "checkpoint: step %d in %s is corrupt or partial (%s: %s); moving it to "
            "%s/corrupt/%d and falling back to the previous checkpoint",
            step,
            self.directory,
            type(e).__name__,
            str(e)[:300],
            self.directory,
            step,
        )
        self._move_aside(step)
    set_aside = self._set_aside_steps()
    if set_aside:
      self.close()  # the caller never gets this manager back to close it
      raise NoUsableCheckpointError(
          f"no checkpoint in {self.directory} restores: steps {set_aside} are corrupt or "
          f"partial and were moved to {self.directory}/corrupt/. Refusing to start over from "
          f"step 0. Put good copies back under {self.directory}, or delete "
          f"{self.directory}/corrupt to train from scratch."
      )
    return None, None

  def _check_layout(self, step: int, abstract_state):
    """Raises CheckpointLayoutError when the step's saved tree differs from abstract_state's.
    Unreadable metadata is left to the restore (and the corrupt-checkpoint path)."""
    try:  # the item's own metadata (a fresh manager's item_metadata() lacks the handler)
      saved = leaf_shapes(
          ocp.PyTreeCheckpointHandler().metadata(self._root() / str(step) / "default")
      )
    except Exception:  # pylint: disable=broad-except; a damaged checkpoint: restore decides
      return
    if not saved:
      return
    problem = describe_layout_mismatch(
        saved, leaf_shapes(abstract_state), f"checkpoint step {step} in {self.directory}"
    )
    if problem:
      self.close()
      raise CheckpointLayoutError(problem)

  def _root(self):
    return fileio.path(self.directory)

  def _set_aside_steps(self) -> list[int]:
    corrupt = self._root() / "corrupt"
    if not corrupt.exists():
      return []
    return sorted(int(p.name) for p in corrupt.iterdir() if p.name.isdigit())

  def _move_aside(self, step: int):
    directory = self._root()
    if jax.process_index() == 0:
      target = directory / "corrupt" / str(step)
      # An object store has no folders: corrupt/ exists once an object is in it (a rename into
      # a "folder" with nothing in it fails), so a note goes there first.
      fileio.write_text(
          target.parent / "README.txt",
          "Checkpoints that failed to restore, moved here from ../ by vim_jax; "
          "delete them once inspected.\n",
      )
      if target.exists():
        target.rmtree()
      (directory / str(step)).rename(target)
    multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(shape_tree, sharding_tree):
  """ShapeDtypeStructs carrying the target shardings, as orbax restore expects."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape_tree, sharding_tree
  )
