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
