"""ctx-jax: CrossTransformers and the Meta-Dataset episode pipeline in JAX."""

import setuptools

setuptools.setup(
    name="ctx-jax",
    version="0.1.0",
    description=(
        "JAX/Flax CrossTransformers (CTX) and a Meta-Dataset episode "
        "pipeline aligned with google-research/meta-dataset."
    ),
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["ctx_jax*", "meta_dataset_pipeline*", "experiments*",
                 "launch*"]),
    # md-convert's ILSVRC split DAGs and duplicate list (official data).
    package_data={"meta_dataset_pipeline.conversion": ["data/*"]},
    install_requires=[
        # JAX by Python version (the versions tested, README "Supported
        # Python and JAX versions"): jax 0.11 and later need Python >= 3.12,
        # so Python 3.11 gets 0.10.x and 3.12 / 3.13 the newest tested,
        # 0.12.x (0.11.2, what accelerator images ship, is tested too).
        # `ctx_jax/xla_config.py` holds the XLA:CPU setting measured for
        # each jaxlib.
        "jax>=0.10.2,<0.11; python_version<'3.12'",
        "jaxlib>=0.10.2,<0.11; python_version<'3.12'",
        "jax>=0.11.2,<0.13; python_version>='3.12'",
        "jaxlib>=0.11.2,<0.13; python_version>='3.12'",
        "flax>=0.12.8,<0.13; python_version<'3.12'",
        "flax>=0.12.12,<0.13; python_version>='3.12'",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        # Paths on any file system (local, gs://), as orbax uses them.
        "etils[epath]>=1.7",
        # orbax writes gs:// checkpoints through it (it does not declare it).
        "google-cloud-storage>=3",
        "chex>=0.1.92",
        "ml-collections>=1.1",
        "absl-py>=2.1",
        "clu>=0.0.12,<0.1",
        "numpy>=2.0",
        "pillow>=10.0",
        # C CRC-32C for record framing (md-convert); a pure-Python fallback
        # exists but runs at about 5 MB/s.
        "google-crc32c>=1.5",
        "matplotlib>=3.8",
        "tensorflow-cpu>=2.21,<2.22",
        # config.data.format="tfds": Meta-Dataset prepared by the official
        # TFDS builder, read by index (array_record).
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        # tensorflow-datasets' builders (`tfds build`, the tests' small TFDS
        # dataset) import it on Python >= 3.9 without declaring it.
        "importlib_resources>=6.0",
        "tensorboard>=2.20",
    ],
    extras_require={
        "test": [
            "pytest>=8", "pytest-xdist>=3.5",
            # tests/gcs_emulator.py: a loopback Cloud Storage emulator for
            # gs:// tests and its TLS certificate.
            "gcp-storage-emulator>=2026.7",
            "cryptography>=42",
        ],
    },
    entry_points={
        "console_scripts": [
            "ctx-demo=ctx_jax.demo.run:run",
            "ctx-train=ctx_jax.main:run",
            "ctx-eval=ctx_jax.eval.main:run",
            "ctx-make-demo-data=ctx_jax.demo.dataset:run",
            "md-episodes=meta_dataset_pipeline.episodes_cli:run",
            "md-episode-grid=meta_dataset_pipeline.episode_grid:run",
            "md-convert=meta_dataset_pipeline.conversion.cli:run",
            "md-index=meta_dataset_pipeline.index_cli:run",
            "ctx-import-official=ctx_jax.checkpoints.official_cli:run",
            "ctx-run-episode=ctx_jax.checkpoints.official_cli:run_episode_main",
            "ctx-attention=ctx_jax.eval.attention_main:run",
        ],
    },
)
