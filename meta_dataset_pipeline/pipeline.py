"""tf.data pipelines of padded episodes and of pretraining batches.

Each element of an episode dataset is one episode, a dict of numpy-able
tensors (S, Q are the padded sizes, H = W = image_size):

| key                  | dtype   | shape     | meaning                        |
|----------------------|---------|-----------|--------------------------------|
| support_images       | float32 | [S,H,W,3] | in [-1, 1]; zeros on padding   |
| support_labels       | int32   | [S]       | way index 0..ways-1; 0 on pad  |
| support_mask         | bool    | [S]       | True on real rows              |
| support_class_ids    | int32   | [S]       | absolute class id; -1 on pad   |
| query_images, query_labels, query_mask, query_class_ids: the same, [Q]    |
| num_ways             | int32   | []        | real ways of the episode       |
| source_id            | int32   | []        | index of the episode's source  |

Real rows come first, grouped by class in the order the sampler drew the
classes (as upstream, whose labels come from `tf.unique` over that order).
S and Q are buckets from `padding.py`.

How an episode is assembled (semantics of the official `EpisodeReader` and
`process_episode`, restructured for throughput):

1. A Python generator samples the description (`sampling.py`), picks the
   source uniformly for multi-source pipelines (as upstream's
   `sample_from_datasets`), and plans the records to pull from each class
   stream, flushed ones included (`reader.EpisodePlanner`).
2. `choose_from_datasets` pulls exactly those records from the per-class
   shuffled, repeated streams (`reader.class_stream`); flushed records are
   dropped before decoding. Upstream pads every episode to a fixed chunk of
   up to 1000 placeholder pulls; here only real records are pulled.
3. Each kept record is parsed, checked, decoded, resized and augmented once,
   with `num_parallel_calls=AUTOTUNE` across records and episodes (upstream
   decodes with a sequential `map_fn` inside each episode).
4. `group_by_window` regroups the records of one episode, and a last map
   pads the support and query sets to their buckets and builds the masks.

The generator is replayed by the two consumers of step 2 (record selection
and per-record metadata); it is a pure function of the seed, so both see the
same plans. Pipelines are deterministic for a given seed.

Parallelism across processes: `process_index` is folded into the seed, so
each process draws its own episodes; to split one episode's rows across
processes instead, give every process the same `process_index` and slice.
"""

from typing import Sequence

import numpy as np
import tensorflow as tf

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import decoder
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import reader
from meta_dataset_pipeline import sampling

AUTOTUNE = tf.data.AUTOTUNE
EPISODE_KEYS = ("support_images", "support_labels", "support_mask",
                "support_class_ids", "query_images", "query_labels",
                "query_mask", "query_class_ids", "num_ways", "source_id")


def _process_seed(seed, process_index, process_count):
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, {process_count})")
  return [int(seed), int(process_index)]


def _as_spec_list(dataset_specs):
  if isinstance(dataset_specs, Sequence) and not isinstance(dataset_specs,
                                                            str):
    return list(dataset_specs)
  return [dataset_specs]


def _make_sources(specs, split, episode_config, seed, use_dag_ontology,
                  use_bilevel_ontology):
  sources = []
  for i, spec in enumerate(specs):
    sampler = sampling.EpisodeDescriptionSampler(
        spec, split, episode_config,
        seed=reader.derive_seeds(seed, 2, i, count=2),
        use_dag_hierarchy=use_dag_ontology,
        use_bilevel_hierarchy=use_bilevel_ontology)
    sources.append(reader.Source(spec, sampler.split, sampler))
  return sources


def episode_buckets(dataset_specs, split, episode_config, pad_multiple=1,
                    bucket_growth=padding.DEFAULT_GROWTH,
                    min_bucket_size=padding.DEFAULT_MIN_SIZE,
                    use_dag_ontology=None, use_bilevel_ontology=None
                    ) -> padding.EpisodeBuckets:
  """The padded (support, query) sizes the episode pipelines can emit.

  Args:
    dataset_specs: one spec or a list of specs.
    split: the split.
    episode_config: an `EpisodeDescriptionConfig`.
    pad_multiple: padded sizes are multiples of this (e.g. device count).
    bucket_growth: geometric ratio between buckets.
    min_bucket_size: smallest bucket of a variable size.
    use_dag_ontology: as in `EpisodeDescriptionSampler`.
    use_bilevel_ontology: as in `EpisodeDescriptionSampler`.

  Returns:
    `padding.EpisodeBuckets`; `num_programs` bounds the compiled shapes.
  """
  sources = _make_sources(_as_spec_list(dataset_specs), split,
                          episode_config, 0, use_dag_ontology,
                          use_bilevel_ontology)
  return padding.buckets_for_samplers([s.sampler for s in sources],
                                      pad_multiple, bucket_growth,
                                      min_bucket_size)


def _episode_generator(sources, seed, buckets, shuffle_buffer_size):
  """Returns a generator function yielding one flat episode at a time."""

  def generate():
    # Built here, not outside: every iteration of the dataset restarts from
    # the seed, as tf.data expects of a deterministic source.
    episodes = reader.EpisodeReader(sources, seed, shuffle_buffer_size)
    aug_rng = np.random.default_rng(reader.derive_seeds(seed, 3, count=2))
    while True:
      ep = episodes.next_episode()
      s_pad, q_pad = buckets.pick(ep.num_support, ep.num_query)
      num = ep.num_support + ep.num_query
      info = np.array([num, ep.num_support, s_pad, q_pad, ep.num_ways,
                       ep.source_id], dtype=np.int64)
      yield {
          "images": np.array(ep.images, dtype=object),
          "labels": ep.labels,
          "class_ids": ep.class_ids,
          "is_support": np.arange(num) < ep.num_support,
          "aug_seeds": aug_rng.integers(0, 2**31 - 1, size=(num, 2)),
          "episode": np.broadcast_to(info, (num, len(info))),
      }

  return generate


_EPISODE_SIGNATURE = {
    "images": tf.TensorSpec([None], tf.string),
    "labels": tf.TensorSpec([None], tf.int32),
    "class_ids": tf.TensorSpec([None], tf.int32),
    "is_support": tf.TensorSpec([None], tf.bool),
    "aug_seeds": tf.TensorSpec([None, 2], tf.int64),
    "episode": tf.TensorSpec([None, 6], tf.int64),
}


def _episode_decode_fn(image_size, support_augmentation, query_augmentation):
  """Per-image map: decode, resize, augment (records were checked)."""

  def decode(ex):
    image = decoder.decode_and_resize(ex["images"], image_size)
    if support_augmentation is not None or query_augmentation is not None:
      image = tf.cond(
          ex["is_support"],
          lambda: decoder.augment(image, support_augmentation,
                                  ex["aug_seeds"]),
          lambda: decoder.augment(image, query_augmentation,
                                  ex["aug_seeds"]))
    return {"image": image, "label": ex["labels"],
            "class_id": ex["class_ids"], "episode": ex["episode"]}

  return decode


def _pad_rows(x, size, value):
  pad = [[0, size - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, pad, constant_values=value)


def _finalize(batch):
  """Splits an episode's rows into padded support and query sets."""
  episode = tf.cast(batch["episode"][0], tf.int32)
  num_support, s_pad, q_pad = episode[1], episode[2], episode[3]
  out = {}
  for prefix, rows, size in (("support_", slice(None, num_support), s_pad),
                             ("query_", slice(num_support, None), q_pad)):
    images = batch["image"][rows]
    count = tf.shape(images)[0]
    out[prefix + "images"] = _pad_rows(images, size, 0.0)
    out[prefix + "labels"] = _pad_rows(batch["label"][rows], size, 0)
    out[prefix + "mask"] = tf.range(size) < count
    out[prefix + "class_ids"] = _pad_rows(batch["class_id"][rows], size, -1)
  out["num_ways"] = episode[4]
  out["source_id"] = episode[5]
  return out


def _episode_dataset(specs, split, episode_config, image_size, seed, *,
                     pad_multiple, bucket_growth, min_bucket_size,
                     shuffle_buffer_size, support_augmentation,
                     query_augmentation, use_dag_ontology,
                     use_bilevel_ontology, process_index, process_count,
                     num_parallel_calls, prefetch):
  """Shared body of the one-source and multi-source builders."""
  if not specs:
    raise ValueError("at least one dataset spec is needed")
  seed = _process_seed(seed, process_index, process_count)
  sources = _make_sources(specs, split, episode_config, seed,
                          use_dag_ontology, use_bilevel_ontology)
  for source in sources:  # Fail now, not on the first episode.
    reader.check_class_files(source.spec, source.split)
  buckets = padding.buckets_for_samplers(
      [s.sampler for s in sources], pad_multiple, bucket_growth,
      min_bucket_size)
  episodes = tf.data.Dataset.from_generator(
      _episode_generator(sources, seed, buckets, shuffle_buffer_size),
      output_signature=_EPISODE_SIGNATURE)
  records = episodes.flat_map(tf.data.Dataset.from_tensor_slices)
  records = records.map(
      _episode_decode_fn(image_size, support_augmentation,
                         query_augmentation),
      num_parallel_calls=num_parallel_calls)
  # Records of one episode are contiguous, so a window keyed by the
  # episode's size closes exactly at the episode's end.
  episodes = records.group_by_window(
      key_func=lambda ex: ex["episode"][0],
      reduce_func=lambda key, window: window.batch(key),
      window_size_func=lambda key: key)
  episodes = episodes.map(_finalize, num_parallel_calls=num_parallel_calls)
  return episodes.prefetch(prefetch)


def make_one_source_episode_dataset(
    dataset_spec, split, episode_config: sampling.EpisodeDescriptionConfig,
    image_size: int, seed: int = 0, *, pad_multiple: int = 1,
    bucket_growth: float = padding.DEFAULT_GROWTH,
    min_bucket_size: int = padding.DEFAULT_MIN_SIZE,
    shuffle_buffer_size: int = reader.DEFAULT_SHUFFLE_BUFFER_SIZE,
    support_augmentation: decoder.DataAugmentation | None = None,
    query_augmentation: decoder.DataAugmentation | None = None,
    use_dag_ontology: bool | None = None,
    use_bilevel_ontology: bool | None = None, process_index: int = 0,
    process_count: int = 1, num_parallel_calls: int = AUTOTUNE,
    prefetch: int = 2) -> tf.data.Dataset:
  """Infinite dataset of padded episodes from one source.

  Args:
    dataset_spec: from `load_dataset_spec`; its `path` holds the records.
    split: a `Split` or its name.
    episode_config: an `EpisodeDescriptionConfig`.
    image_size: output height and width.
    seed: seeds sampling, class shuffles and augmentation.
    pad_multiple: padded support/query sizes are multiples of this.
    bucket_growth: ratio between padding buckets (see `padding.py`).
    min_bucket_size: smallest padding bucket of a variable size.
    shuffle_buffer_size: per-class shuffle buffer bound (upstream: 1000).
    support_augmentation: `DataAugmentation` for support images, or None.
    query_augmentation: `DataAugmentation` for query images, or None.
    use_dag_ontology: None: decided by the spec type and config.
    use_bilevel_ontology: None: decided by the spec type and config.
    process_index: this process's index (folded into the seed).
    process_count: number of processes.
    num_parallel_calls: decode parallelism.
    prefetch: episodes prefetched.

  Returns:
    A `tf.data.Dataset` of episode dicts (see module docstring).
  """
  return _episode_dataset(
      [dataset_spec], split, episode_config, image_size, seed,
      pad_multiple=pad_multiple, bucket_growth=bucket_growth,
      min_bucket_size=min_bucket_size,
      shuffle_buffer_size=shuffle_buffer_size,
      support_augmentation=support_augmentation,
      query_augmentation=query_augmentation,
      use_dag_ontology=use_dag_ontology,
      use_bilevel_ontology=use_bilevel_ontology,
      process_index=process_index, process_count=process_count,
      num_parallel_calls=num_parallel_calls, prefetch=prefetch)


def make_multisource_episode_dataset(
    dataset_spec_list, split, episode_config, image_size, seed=0,
    **kwargs) -> tf.data.Dataset:
  """Episodes from several sources, one source per episode, chosen uniformly.

  Args:
    dataset_spec_list: specs of the sources (`source_id` indexes this list).
    split: the split, the same for every source.
    episode_config: an `EpisodeDescriptionConfig` (shared by the sources).
    image_size: output height and width.
    seed: seeds everything, as in `make_one_source_episode_dataset`.
    **kwargs: the keyword options of `make_one_source_episode_dataset`.

  Returns:
    A `tf.data.Dataset` of episode dicts; padding buckets cover all sources.
  """
  options = dict(
      pad_multiple=1, bucket_growth=padding.DEFAULT_GROWTH,
      min_bucket_size=padding.DEFAULT_MIN_SIZE,
      shuffle_buffer_size=reader.DEFAULT_SHUFFLE_BUFFER_SIZE,
      support_augmentation=None,
      query_augmentation=None, use_dag_ontology=None,
      use_bilevel_ontology=None, process_index=0, process_count=1,
      num_parallel_calls=AUTOTUNE, prefetch=2)
  unknown = set(kwargs) - set(options)
  if unknown:
    raise TypeError(f"unexpected arguments {sorted(unknown)}")
  options.update(kwargs)
  return _episode_dataset(list(dataset_spec_list), split, episode_config,
                          image_size, seed, **options)


def make_batch_dataset(
    dataset_spec, split, batch_size: int, image_size: int, seed: int = 0, *,
    shuffle_buffer_size: int = reader.DEFAULT_SHUFFLE_BUFFER_SIZE,
    augmentation: decoder.DataAugmentation | None = None,
    process_index: int = 0, process_count: int = 1,
    num_parallel_calls: int = AUTOTUNE, prefetch: int = 2
) -> tf.data.Dataset:
  """Infinite dataset of non-episodic batches, for pretraining.

  Record order as the official `BatchReader` (see `reader.BatchReader`):
  classes mixed with probabilities proportional to their sizes, then one
  shuffle buffer of `shuffle_buffer_size`, epoch after epoch. Deliberate
  changes: batches always hold `batch_size` images (epochs run into each
  other instead of ending with a short batch, for static shapes), and
  decoding runs in parallel.

  Args:
    dataset_spec: from `load_dataset_spec`.
    split: a `Split` or its name.
    batch_size: images per batch.
    image_size: output height and width.
    seed: seeds the class mixing, shuffling and augmentation.
    shuffle_buffer_size: size of the single shuffle buffer.
    augmentation: optional `DataAugmentation`.
    process_index: folded into the seed.
    process_count: number of processes.
    num_parallel_calls: decode parallelism.
    prefetch: batches prefetched.

  Returns:
    A dataset of dicts: `images` float32 [B,H,W,3] in [-1, 1], `labels`
    int32 [B] (class id relative to the split, 0..num_classes-1) and
    `class_ids` int32 [B] (absolute).
  """
  seed = _process_seed(seed, process_index, process_count)
  split = spec_lib._as_split(split)  # pylint: disable=protected-access
  batch_reader = reader.BatchReader(dataset_spec, split, seed,
                                    shuffle_buffer_size)
  offset = dataset_spec.get_classes(split).start
  chunk = 256

  def generate():
    images = iter(reader.BatchReader(dataset_spec, split, seed,
                                     shuffle_buffer_size))
    aug_rng = np.random.default_rng(reader.derive_seeds(seed, 6, count=2))
    while True:
      rows = [next(images) for _ in range(chunk)]
      yield {
          "images": np.array([r[0] for r in rows], dtype=object),
          "class_ids": np.array([r[1] for r in rows], dtype=np.int32),
          "aug_seeds": aug_rng.integers(0, 2**31 - 1, size=(chunk, 2)),
      }

  del batch_reader  # Built above only to fail early on bad files.
  signature = {k: _EPISODE_SIGNATURE[k]
               for k in ("images", "class_ids", "aug_seeds")}
  chunks = tf.data.Dataset.from_generator(generate,
                                          output_signature=signature)

  def decode(ex):
    image = decoder.decode_and_resize(ex["images"], image_size)
    image = decoder.augment(image, augmentation, ex["aug_seeds"])
    return {"images": image, "labels": ex["class_ids"] - offset,
            "class_ids": ex["class_ids"]}

  batches = chunks.flat_map(tf.data.Dataset.from_tensor_slices).map(
      decode, num_parallel_calls=num_parallel_calls)
  return batches.batch(batch_size, drop_remainder=True).prefetch(prefetch)
