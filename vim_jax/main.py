"""Entry point: python -m vim_jax.main --config=configs/<file>.py[:variant] --workdir=DIR

The config's `trainer` field picks the trainer; `--config.key=value` overrides any field (the
config is locked, so a misspelt key fails and lists the valid ones). Rerunning the same command
with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's start-up chatter

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vim_jax.infra import config_files, distributed, log_filters  # noqa: E402

TRAINERS = {
    "tokenizer": "vim_jax.trainers.tokenizer",  # stage 1: the ViT-VQGAN tokenizer
    "vim": "vim_jax.trainers.vim",  # stage 2: the autoregressive transformer
    "classifier": "vim_jax.trainers.classifier",  # scores samples (rejection sampling)
    "quickstart": "vim_jax.trainers.quickstart",  # all of the above on the embedded data
    # Stage 1's former key, still accepted (with a warning) in configs written before;
    # runs.RENAMED_TRAINERS maps it to its name.
    "vitvq": "vim_jax.trainers.tokenizer",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a variant: configs/vitvq_base.py:tiny",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory (local or gs://) for checkpoints, TensorBoard logs and images; "
    "rerun with the same one to resume.",
)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def worker_failure_message(error: BaseException, workdir: str, process: int, count: int) -> str:
  """What a process of a multi-process job says when its run fails: most often another
  process died, and every process must be started again."""
  from vim_jax.infra import runs  # lazy: --help without jax

  found = re.findall(r"/task:(\d+)|Task (\d+) heartbeat", str(error))
  dead = sorted({int(a or b) for a, b in found} - {process})
  who = (
      f"JAX names process {', '.join(map(str, dead))}"
      if dead
      else "JAX's coordination service names it within --heartbeat_timeout seconds ('Task N "
      "heartbeat timeout': process N)"
  )
  steps = runs.checkpoint_steps(workdir)
  resume = f"step {steps[-1]}" if steps else "the start (no checkpoint yet)"
  return (
      f"process {process} of {count} stopped: {type(error).__name__}: "
      f"{str(error).splitlines()[0][:300] if str(error) else ''}\n"
      f"In a job of {count} processes this is most often another process that died: {who}. "
      f"Start every process again with the same command (launch/README.md, 'When a worker "
      f"dies'); the run resumes from {resume}, exactly."
  )


# Exception classes (by name, anywhere in an exception's class hierarchy: aiohttp, requests,
# google-api-core and the builtins) that mean the storage server could not be reached, as
# opposed to a missing object or a permission (which are the run's own errors to report).
_CONNECTION_ERRORS = {
    "ConnectionError",
    "TimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServiceUnavailable",
    "RetryError",
    "gaierror",
}
# What tensorstore and gcsfs say in a message when they give up on an unreachable server.
_CONNECTION_MESSAGES = (
    "Connection refused",
    "Cannot connect to host",
    "UNAVAILABLE",
    "Server disconnected",
    "Connection reset",
)


def unreachable_bucket(error: BaseException, workdir: str) -> str | None:
  """gs://BUCKET of a remote workdir when `error` came from its storage client failing to
  reach the server (a refused or dropped connection, somewhere in its causes); else None."""
  if not workdir.startswith("gs://"):
    return None
  seen = error
  while seen is not None:
    names = {cls.__name__ for cls in type(seen).__mro__}
    if names & _CONNECTION_ERRORS or any(m in str(seen) for m in _CONNECTION_MESSAGES):
      return "gs://" + workdir[len("gs://") :].split("/", 1)[0]
    seen = seen.__cause__ or seen.__context__
  return None


def storage_failure_message(error: BaseException, bucket: str) -> str:
  """What a run says when its bucket stops answering mid-run."""
  return (
      f"stopped: the bucket {bucket} stopped answering ({type(error).__name__}: "
      f"{str(error).splitlines()[0][:300] if str(error) else ''}). Nothing written since "
      "the last completed checkpoint counts: a checkpoint becomes a step only once all of "
      "it is written (an interrupted save is left as a temporary folder, never restored). "
      "Once the bucket answers again (network, credentials, $STORAGE_EMULATOR_HOST), run "
      "the same command: it resumes from the last completed checkpoint."
  )


def train(config, workdir: str, **kwargs):
  """Runs the trainer that config.trainer names (what `python -m vim_jax.main` does after
  start-up); kwargs go to its train_and_evaluate. Benchmarks train through this, so that only
  this module and the quickstart import trainers."""
  if config.trainer not in TRAINERS:
    raise ValueError(f"config.trainer={config.trainer!r}; expected one of {sorted(TRAINERS)}.")
  from vim_jax.infra import runs  # lazy: --help without jax

  if config.trainer in runs.RENAMED_TRAINERS:
    new = runs.RENAMED_TRAINERS[config.trainer]
    logging.warning("config.trainer=%r is deprecated; it is now %r.", config.trainer, new)
    config.trainer = new  # what config.json records
  trainer = importlib.import_module(TRAINERS[config.trainer])
  return trainer.train_and_evaluate(config, workdir, **kwargs)


def hide_gpus_from_tensorflow():
  """TF is only used for summaries and tfds; keep it off the accelerators JAX needs."""
  try:
    import tensorflow as tf  # lazy: TensorFlow takes seconds to load

    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pylint: disable=broad-except; TF absent or already initialised
    pass


load_config_file = config_files.load  # benchmarks load configs as --config does


def unknown_override_message(argv: list[str]) -> str | None:
  """For each --config.a.b=v whose key does not exist, the valid keys at that level."""
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not specs:
    return None
  try:
    config = load_config_file(specs[-1])
  except Exception:  # pylint: disable=broad-except; the flag parser reports it itself
    return None
  problems = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = ".".join(path[:depth]) or "(top level)"
        problems.append(f"unknown config key {'.'.join(path)!r}: {where} has keys {sorted(keys)}")
        break
      node = node[key]
  return "\n".join(problems) or None


def parse_flags(argv):
  """absl flag parsing, with a readable error for misspelt --config.* overrides."""
  config_files.add_config_roots(argv)  # `from configs import common`, from any folder
  message = unknown_override_message(argv)
  if message:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)
  return flags.FLAGS(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  log_filters.install()
  config = _CONFIG.value
  if config.trainer not in TRAINERS:
    raise app.UsageError(f"config.trainer={config.trainer!r}; expected one of {sorted(TRAINERS)}.")
  from vim_jax.infra import config_checks  # lazy: --help without jax

  try:
    config_checks.check(config)  # every stage's, before start-up and compiles
  except config_checks.ConfigValueError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  from vim_jax.infra import prng  # lazy: --help without jax
  # Before anything starts a jax backend (or TF, which may load libtpu too): libtpu reads its
  # flags once, when it starts.
  if prng.configure_libtpu(config):
    logging.info(
        "LIBTPU_INIT_ARGS=%s (rbg dropout draws each chip's shard alone; vim_jax/infra/prng.py)",
        os.environ["LIBTPU_INIT_ARGS"],
    )
  hide_gpus_from_tensorflow()
  distributed.start()
  from vim_jax.data import sources  # lazy: --help without jax
  from vim_jax.infra import (
      fileio,  # lazy: --help without jax
      preemption,  # lazy: --help without jax
  )
  # Relative paths are resolved once, here, against the folder the command starts in, and a
  # tfds run records the data_dir it reads ($TFDS_DATA_DIR when its config leaves it empty).
  config = sources.with_recorded_data_dir(fileio.with_absolute_paths(config))
  logging.info("config:\n%s", config)
  preemption.install_preemption_handler()  # SIGTERM: save at the next step, exit 0
  workdir = fileio.absolute(_WORKDIR.value)
  try:  # a missing bucket stops here, not at the first save after the compile
    fileio.check_buckets(
        {"--workdir": workdir, **{f"config.{k}": v for k, v in fileio.path_fields(config).items()}}
    )
  except FileNotFoundError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  try:
    train(config, workdir)
  except Exception as e:  # pylint: disable=broad-except; explained, then raised as it was
    import jax  # lazy: --help without jax

    bucket = unreachable_bucket(e, workdir)
    if bucket:
      # The storage client's own threads (orbax's background commit, gcsfs's event loop) keep
      # retrying and would hold the process open after the exception: say why, and end it.
      traceback.print_exc()
      logging.error("%s", storage_failure_message(e, bucket))
      logging.flush()
      sys.stderr.flush()
      os._exit(1)
    if jax.process_count() > 1:
      logging.error(
          "%s", worker_failure_message(e, workdir, jax.process_index(), jax.process_count())
      )
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
