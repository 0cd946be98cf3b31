"""vim_jax: ViT-VQGAN and VIM (Yu et al., ICLR 2022) in JAX/Flax."""

import os as _os
import tempfile as _tempfile

from vim_jax.infra import storage as _storage

# Before any submodule imports a storage client: with $STORAGE_EMULATOR_HOST set, every gs://
# access goes to that server (see vim_jax/infra/storage.py); without it, nothing changes.
_storage.use_emulator_if_set()
# `import tensorflow` (tfds's) imports Keras, which writes ~/.keras/keras.json the first time;
# we never use Keras, and a run writes nothing in $HOME (tests/test_gcs.py checks).
_os.environ.setdefault("KERAS_HOME", _os.path.join(_tempfile.gettempdir(), "keras"))
