"""Builds episode iterators for training and evaluation from a config.

The only place in `ctx_jax` that touches `meta_dataset_pipeline` (and hence
TensorFlow); the model and the train step never do.
"""

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from ctx_jax import config_checks
from ctx_jax.data import augment
from ctx_jax.data import compile_plan
import meta_dataset_pipeline as mdp


def episode_description_config(cfg: ml_collections.ConfigDict
                               ) -> "mdp.EpisodeDescriptionConfig":
  return mdp.EpisodeDescriptionConfig(**cfg.to_dict())


def max_ways(config: ml_collections.ConfigDict, split: str) -> int:
  """Static logit width for episodes of `split`.

  With SimCLR episodes (`simclr_episode_fraction` > 0) every support image
  is a class, so the width also covers the largest support set: ways x
  shots for a fixed shot count, else `max_support_set_size`. The ways bound
  itself is the sampler's (`sampling.max_ways`, as upstream).
  """
  data = config.data
  cfg = data.train_episode if split == "TRAIN" else data.eval_episode
  ways = int(mdp.max_ways(episode_description_config(cfg)))
  if not cfg.get("simclr_episode_fraction"):
    return ways
  shots = cfg.num_support
  if shots is None:
    return max(ways, int(cfg.max_support_set_size))
  if isinstance(shots, (tuple, list)):
    shots = shots[1]
  return ways * int(shots)


def episode_augmentations(config: ml_collections.ConfigDict, split: str
                          ) -> dict[str, "mdp.SimCLRAugmentation | None"]:
  """The `simclr_augmentation` / `md_augmentation` pipeline arguments.

  `config.data.simclr` holds the SimCLR episode augmentation settings
  (`mdp.SimCLRAugmentation` fields); `config.data.md_augmentation` ("none"
  or "bohb") augments ordinary training episodes, "bohb" with the settings
  in `config.data.bohb` (same fields). Evaluation episodes are never
  augmented.
  """
  data = config.data
  settings = lambda d: {k: tuple(v) if isinstance(v, (list, tuple)) else v
                        for k, v in d.to_dict().items()}
  try:
    simclr = mdp.SimCLRAugmentation(**settings(data.simclr))
    md = None
    if split == "TRAIN":
      overrides = {}
      if data.md_augmentation == "bohb" and "bohb" in data:
        overrides = settings(data.bohb)
      md = mdp.augmentation_by_name(data.md_augmentation, **overrides)
  except ValueError as e:
    raise ValueError(f"config.data.simclr / md_augmentation / bohb: {e}"
                     ) from None
  return {"simclr_augmentation": simclr, "md_augmentation": md,
          "augment_on_device": augments_on_device(config, split)}


def augments_on_device(config: ml_collections.ConfigDict, split: str) -> bool:
  """Whether training episodes are augmented on the accelerator.

  `config.data.augment_on`: "host" (tf.data, default) or "device" (JAX,
  `ctx_jax.data.augment`, for hosts whose CPUs cannot keep up). Only
  training episodes: evaluation episodes are augmented on the host, if at
  all.
  """
  where = config.data.augment_on
  if where not in ("host", "device"):
    raise ValueError(f"config.data.augment_on must be 'host' or 'device', "
                     f"got {where!r}")
  return split == "TRAIN" and where == "device"


def device_augmenter(config: ml_collections.ConfigDict):
  """(extra episode keys, jitted episode -> episode) for on-device
  augmentation of training episodes, or ((), None) when it is off."""
  if not augments_on_device(config, "TRAIN"):
    return (), None
  kwargs = episode_augmentations(config, "TRAIN")
  to_params = lambda a: augment.AugmentParams(**dataclasses.asdict(a))
  simclr = to_params(kwargs["simclr_augmentation"])
  md = kwargs["md_augmentation"]
  md = None if md is None else to_params(md)
  fn = jax.jit(functools.partial(augment.augment_episode, simclr=simclr,
                                 md=md))
  return augment.DEVICE_KEYS, fn


def episodes(config: ml_collections.ConfigDict, split: str,
             sources: Sequence[str], seed: int, pad_multiple: int = 1,
             process_index: int = 0, process_count: int = 1,
             start_episode: int = 0,
             buckets: "mdp.EpisodeBuckets | None" = None
             ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of padded numpy episodes of `split` from `sources`.

  Every process draws the same episodes (same seed) and keeps its own
  contiguous block of support and query rows, as the official distributed
  learner splits an episode over replicas.

  Args:
    config: the experiment config (uses `config.data`).
    split: "TRAIN", "VALID" or "TEST".
    sources: source names, folders under `config.data.records_root`.
    seed: episode sampling seed.
    pad_multiple: support and query sizes are padded to a multiple of this
      (the global device count), so the episode splits evenly.
    process_index: this process's index.
    process_count: number of processes.
    start_episode: index of the first episode of the seeded stream (resume).
    buckets: padded shapes to use (e.g. `eval_buckets`); None: buckets
      fitted to these sources and split (`config.data.num_buckets`).

  Yields:
    Episode dicts (see `meta_dataset_pipeline`), rows of this process only.
  """
  data = config.data
  specs = config_checks.load_config_specs(data, sources)
  episode_cfg = episode_description_config(
      data.train_episode if split == "TRAIN" else data.eval_episode)
  kwargs = dict(split=mdp.Split[split], episode_config=episode_cfg,
                image_size=data.image_size, seed=seed,
                pad_multiple=pad_multiple,
                num_buckets=int(data.get("num_buckets", 0)),
                shuffle_buffer_size=data.shuffle_buffer_size,
                decoded_cache_bytes=int(data.decoded_cache_mb) << 20,
                start_episode=start_episode, buckets=buckets,
                row_block=((process_index, process_count)
                           if process_count > 1 else None),
                **episode_augmentations(config, split))
  # Each process reads and decodes only its rows (`row_block`): the same as
  # `local_rows` of the whole episode, without decoding the others' images.
  # With workers, the arrays are views of shared memory, given back to the
  # pipeline when the step no longer holds them.
  yield from mdp.make_episode_iterator(
      specs, num_workers=num_workers(config), **kwargs)


def num_workers(config: ml_collections.ConfigDict) -> int:
  """`config.data.num_workers`, with -1 ("auto") resolved.

  Auto: the CPUs this process may use, shared with the other processes of
  this host (`CTX_JAX_PROCESSES_PER_HOST`, set by `launch.local` and
  `launch.slurm`), less one for the training loop; 0 below 4 CPUs
  (`mdp.workers.default_num_workers`). TFDS-prepared data and the decoded
  image cache are read in-process (0).
  """
  data = config.data
  k = int(data.get("num_workers", 0))
  if k < -1:
    raise ValueError(f"config.data.num_workers must be >= -1, got {k}")
  if k == -1:
    if data.get("format", "records") != "records" or data.decoded_cache_mb:
      return 0
    k = mdp.workers.default_num_workers()
  return k


def eval_buckets(config: ml_collections.ConfigDict, split: str, source: str,
                 pad_multiple: int) -> "mdp.EpisodeBuckets | None":
  """The padded shapes shared by every evaluation episode of a run.

  One set for validation, the final test and `ctx-eval` of any source
  (`compile_plan`), so evaluation compiles at most
  `config.data.eval_num_shapes` programs; the same in every process (fitted
  with a fixed seed). None when `eval_num_shapes` is 0 (each source and
  split fits its own buckets). A source whose spec cannot be read is left
  out of the fit unless it is the one evaluated (whose error is then raised
  by the pipeline as before).
  """
  pair = (source, split)
  extra = () if pair in compile_plan.eval_sources(config) else (pair,)

  def load_spec(name):
    try:
      return config_checks.load_config_specs(config.data, [name])[0]
    except Exception:  # pylint: disable=broad-except
      if name == source:
        raise
      return None
  return compile_plan.cached_eval_buckets(config, load_spec, pad_multiple,
                                          extra)


def local_rows(episode: dict[str, np.ndarray], process_index: int,
               process_count: int) -> dict[str, np.ndarray]:
  """This process's block of the support and query rows of a whole episode.

  The same block (`padding.row_block`) as the pipeline's `row_block` gives
  without reading the other rows.
  """
  out = dict(episode)
  for prefix in ("support_", "query_"):
    keys = [k for k in episode if k.startswith(prefix)]
    rows = mdp.padding.row_block(episode[keys[0]].shape[0], process_index,
                                 process_count)
    for k in keys:
      out[k] = episode[k][rows.start:rows.stop]
  return out


# Data prepared as records or by the official TFDS builder
# (config.data.format).
