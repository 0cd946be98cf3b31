"""Pieces the trainers share: train-metric windows closed one step late."""

import jax.numpy as jnp
import pytest

from vim_jax.infra import flops, progress_log
from vim_jax.trainers import loop


def _progress():
  return progress_log.Progress(0, 10, 8, flops.StepFlops(1e9, 1e9), 1)


class _Writer:

  def __init__(self):
    self.writes = []

  def write_scalars(self, step, scalars):
    self.writes.append((step, scalars))


def test_a_window_is_fetched_after_the_next_step_is_dispatched_and_the_last_at_once():
  writer, lines = _Writer(), []
  windows = loop.TrainWindows(
      writer, _progress(), lambda step, scalars: lines.append((step, scalars["loss"]))
  )
  windows.add({"loss": jnp.asarray(1.0)})
  windows.add({"loss": jnp.asarray(3.0)})
  windows.end(2, None, 0, at_once=False)
  assert writer.writes == [] and lines == []  # step 3 is not dispatched yet
  windows.close_pending()  # ... now it is
  windows.add({"loss": jnp.asarray(5.0)})  # step 3's metrics start the next window
  assert [s for s, _ in writer.writes] == [2] and lines == [(2, 2.0)]
  assert writer.writes[0][1]["train/loss"] == 2.0 and "data/skipped_images" in writer.writes[0][1]
  windows.end(3, 2, 1, at_once=True)  # the run's end: written now
  assert lines == [(2, 2.0), (3, 5.0)] and [m["step"] for m in windows.logged] == [2, 3]
  windows.close_pending()  # nothing left: no second write
  assert len(writer.writes) == 2


def test_a_nan_window_stops_the_run_naming_its_step_and_the_last_checkpoint():
  windows = loop.TrainWindows(_Writer(), _progress(), lambda step, scalars: None)
  windows.add({"loss": jnp.asarray(float("nan"))})
  windows.end(4, 3, 0, at_once=False)
  with pytest.raises(FloatingPointError, match="at step 4.*last good checkpoint is step 3"):
    windows.close_pending()
