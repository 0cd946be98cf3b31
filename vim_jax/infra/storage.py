"""Where gs:// goes: real Google Cloud Storage, or the server `STORAGE_EMULATOR_HOST` names.

A run reaches GCS through four clients, each with its own way of being pointed elsewhere:

  client                                   used for                        endpoint setting
  tensorstore                              orbax's checkpoint arrays       TENSORSTORE_GCS_HTTP_URL
  google-cloud-storage                     orbax's bucket-layout check     STORAGE_EMULATOR_HOST
  etils.epath -> TensorFlow's tf.io.gfile  orbax's folders, our files,     none (endpoint built
                                           tfds's data dirs                into libtensorflow)
  etils.epath -> fsspec/gcsfs              the same, with EPATH_USE_TF=0   STORAGE_EMULATOR_HOST
  google-cloud-cpp (riegeli)               array_record reads of tfds data
                                                                           CLOUD_STORAGE_EMULATOR_ENDPOINT

TensorBoard event files are written by `vim_jax.infra.summaries` through our path layer, so no
TensorFlow GCS client is left on our paths.

With `STORAGE_EMULATOR_HOST` set (Google's own convention, e.g. `127.0.0.1:9023` or
`http://127.0.0.1:9023`), `use_emulator_if_set` points every client above at that server:
epath goes through gcsfs, which honours the variable (TensorFlow's client cannot be pointed
anywhere), and the others get their own variables. Without it nothing is changed: every
client talks to the real GCS. It runs when `vim_jax` is imported, before any of
these clients reads its settings, so every command, the notebook and the tests get it.
"""

from __future__ import annotations

import importlib.util
import os

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def emulator_url() -> str | None:
  """The emulator's base URL from $STORAGE_EMULATOR_HOST (a scheme added if missing), or None."""
  host = os.environ.get(EMULATOR_VARIABLE, "").strip().rstrip("/")
  if not host:
    return None
  return host if "://" in host else f"http://{host}"


def use_emulator_if_set() -> str | None:
  """Points every GCS client of the project at $STORAGE_EMULATOR_HOST; returns its URL (None,
  and nothing changed, when the variable is unset)."""
  url = emulator_url()
  if url is None:
    return None
  if importlib.util.find_spec("gcsfs") is None:
    raise RuntimeError(
        f"{EMULATOR_VARIABLE}={os.environ[EMULATOR_VARIABLE]} asks for a GCS emulator, and gs:// "
        "files then go through gcsfs (TensorFlow's GCS client has its endpoint built in), which "
        "is not installed: pip install gcsfs (the test extra has it), or unset the variable."
    )
  settings = {
      "TENSORSTORE_GCS_HTTP_URL": url,
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
      # epath sends gs:// to TensorFlow's client whenever TensorFlow is importable: use fsspec.
      "EPATH_USE_TF": "0",
      # gcsfs >= 2026 otherwise asks a gRPC storage-control service for the bucket type, which
      # an emulator does not serve: each call would wait for its 60 s timeout.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # An emulator takes anonymous requests; skip the credential lookup (and the GCE metadata
      # probe) that would otherwise run first.
      "NO_GCE_CHECK": "true",
  }
  os.environ.update(settings)
  # The token is read from here when gcsfs's filesystem is first made.
  import fsspec.config  # lazy: comes with gcsfs, optional (checked above)

  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  return url
