"""Meta-Dataset episode pipeline (tf.data + numpy; never imports JAX).

Public API:

    import meta_dataset_pipeline as mdp
    spec = mdp.load_dataset_spec(records_dir)
    cfg = mdp.EpisodeDescriptionConfig()          # variable way and shot
    ds = mdp.make_one_source_episode_dataset(spec, mdp.Split.TRAIN, cfg,
                                             image_size=84, seed=0)
    for episode in ds.as_numpy_iterator(): ...

See `pipeline.py` for the episode dict, `sampling.py` for the sampler,
`padding.py` for the padding policy, `dataset_spec.py` for specs and
`simclr.py` for SimCLR episodes and augmentations.

Names are imported on first use (PEP 562), so that tools which need only a
light submodule (`records_writer`, `dataset_spec`, `conversion`) do not pay
for TensorFlow's import, which the pipeline modules need.
"""

import importlib
import os

# Records on a bucket (`gs://`): TensorFlow's GCS file system reads
# GCS_READ_CACHE_BLOCK_SIZE_MB once, when TensorFlow is imported, so it is
# set here, on the package's import, before anything of it imports TF
# (ctx-train and ctx-eval import this package before TensorFlow); a value
# the user exported wins. TF's default, 64 MB, makes every read of an open
# file fetch (and that file hold) a 64 MB block: 17 GB of memory and 4x
# slower on the emulator (benchmarks/RESULTS.md, "Start-up at scale"). 0
# turns the block buffer off, so a read of n bytes fetches exactly n (one
# ranged request, plus one for the byte TF probes before a seek's target):
# `record_files.read_records` merges an episode's records of a class into
# few such reads. Measured with benchmarks/bucket_read_bench.py (emulated
# bucket: 30 ms a request, 100 MB/s; 10 records of 100 KB from each of 20
# classes): 1 MB blocks fetch 3-10x the bytes (a 1 MB block per record
# read); with 20 reading threads 0 gave 1.7x the records/s of 1 MB (117 vs
# 70 per s), with 2 threads (latency-bound: 0 costs a probe request more
# per read) 1 MB gave 1.7x (49 vs 29). The pipeline reads in many threads
# and processes, and the bytes are what saturate a host's network, so 0.
os.environ.setdefault("GCS_READ_CACHE_BLOCK_SIZE_MB", "0")

_EXPORTS = {
    "BiLevelDatasetSpecification": "dataset_spec",
    "DatasetSpecification": "dataset_spec",
    "HierarchicalDatasetSpecification": "dataset_spec",
    "load_dataset_spec": "dataset_spec",
    "load_tfds_spec": "tfds_source",
    "Split": "dataset_spec",
    "SpecError": "dataset_spec",
    "DataAugmentation": "decoder",
    "EpisodeBuckets": "padding",
    "episode_buckets": "pipeline",
    "EPISODE_KEYS": "pipeline",
    "make_episode_iterator": "pipeline",
    "make_multisource_episode_dataset": "pipeline",
    "make_one_source_episode_dataset": "pipeline",
    "RecordError": "record_files",
    "check_sources": "record_files",
    "EpisodeDescription": "sampling",
    "EpisodeDescriptionConfig": "sampling",
    "EpisodeDescriptionSampler": "sampling",
    "max_ways": "sampling",
    "augmentation_by_name": "simclr",
    "BOHB_AUGMENTATION": "simclr",
    "SIMCLR_AUGMENTATION": "simclr",
    "SimCLRAugmentation": "simclr",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is not None:
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
  try:
    # Submodules as attributes (`mdp.sampling`), as after an eager import.
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
