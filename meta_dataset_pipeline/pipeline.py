"""tf.data pipelines of padded episodes.

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
   `sample_from_datasets`), and reads exactly the records the episode keeps
   from the per-class shuffled streams, with upstream's pass-and-flush
   semantics (`reader.py`). Each record is parsed and checked there, so
   errors name the file, record and class. Upstream instead pulls every
   episode through a fixed chunk of up to 1000 placeholder and flushed
   records per episode from ~20 ms-to-build per-class `TFRecordDataset`s.
2. The encoded images travel to TF as one buffer per episode.
3. A map over episodes (`num_parallel_calls=AUTOTUNE`, so episodes decode
   concurrently) decodes each image once, resizes, augments, pads the
   support and query sets to their buckets and builds the masks
   (`decoder.decode_rows`: one loop per set writing each row once into the
   padded tensor; an image that fails to decode is reported with its file,
   record and class). Upstream decodes with a sequential `map_fn` inside a
   sequential map. With `decoded_cache_bytes`, decoded images are
   kept (exactly) and their records are not read again.

SimCLR episodes (`simclr.py`): with probability
`episode_config.simclr_episode_fraction` (a stateless draw per episode
index) the generator turns the episode into an instance-discrimination
episode (query rows become copies of support rows, labels support indices),
and the map augments its rows SimCLR-style; the keys and shapes stay the
same. With `augment_on_device=True` the map leaves that augmentation to the
accelerator and adds `{support,query}_aug_seeds` int32 [S|Q, 2] and
`{support,query}_aug_mode` int32 [S|Q] (see `ctx_jax/data/augment.py`).

Parallelism across processes: `process_index` is folded into the seed, so
each process draws its own episodes; to split one episode's rows across
processes instead, give every process the same seed and its own
`row_block=(process, num_processes)`: each then reads and decodes only its
block of the support and query rows.

Known TF issue: a `from_generator` pipeline whose iterator is still alive
when Python exits can hang or abort at exit (TF 2.21). An at-exit guard
here makes that rarer; dropping iterators before exit (`del it`, or
iterating inside a function) avoids it.
"""

import atexit
import itertools
import threading
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from meta_dataset_pipeline import decoder
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import reader
from meta_dataset_pipeline import sampling
from meta_dataset_pipeline import simclr as simclr_lib

AUTOTUNE = tf.data.AUTOTUNE


class _ExitGuard:
  """Keeps tf.data threads out of our Python generators at interpreter exit.

  A `from_generator` pipeline whose iterator is still alive when Python
  exits can hang or abort the process (seen with TF 2.21 in 1 run of 3):
  a tf.data thread calls into the generator while the interpreter shuts
  down. At exit this guard makes the generators end their streams and waits
  (at most `timeout` seconds) until none is running, so the last call that
  tf.data makes into Python happens before shutdown.
  """

  def __init__(self, timeout: float = 5.0, quiet: float = 0.2):
    self.stop = threading.Event()
    self._lock = threading.Lock()
    self._busy = 0
    self._live = 0
    self._last_busy = 0.0
    self._timeout, self._quiet = timeout, quiet

  def enter(self):
    with self._lock:
      self._busy += 1

  def leave(self):
    with self._lock:
      self._busy -= 1
      self._last_busy = time.monotonic()

  def wrap(self, generate):
    """Wraps a generator function: stops at exit, tracks running calls."""
    def guarded():
      with self._lock:
        self._live += 1
      items = generate()
      try:
        while not self.stop.is_set():
          self.enter()
          try:
            item = next(items)
          except StopIteration:
            return
          finally:
            self.leave()
          yield item
      finally:
        with self._lock:
          self._live -= 1
    return guarded

  def at_exit(self):
    self.stop.set()
    deadline = time.monotonic() + self._timeout
    while time.monotonic() < deadline:
      with self._lock:
        idle = (self._busy == 0 and (
            self._live == 0
            or time.monotonic() - self._last_busy > self._quiet))
      if idle:
        return
      time.sleep(0.01)


_EXIT_GUARD = _ExitGuard()
atexit.register(_EXIT_GUARD.at_exit)
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
  # rng="official": the official samplers' RandomStates, built in source
  # order from the run's seed, as upstream after seeding its module RNG.
  official = (sampling.official_rngs(seed[0], len(specs))
              if episode_config.rng == "official" else None)
  for i, spec in enumerate(specs):
    sampler = sampling.EpisodeDescriptionSampler(
        spec, split, episode_config,
        seed=(official[i] if official else
              reader.derive_seeds(seed, 2, i, count=2)),
        use_dag_hierarchy=use_dag_ontology,
        use_bilevel_hierarchy=use_bilevel_ontology)
    sources.append(reader.Source(spec, sampler.split, sampler))
  return sources


def episode_buckets(dataset_specs, split, episode_config, pad_multiple=1,
                    bucket_growth=padding.DEFAULT_GROWTH,
                    min_bucket_size=padding.DEFAULT_MIN_SIZE,
                    use_dag_ontology=None, use_bilevel_ontology=None,
                    num_buckets=0) -> padding.EpisodeBuckets:
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
    num_buckets: > 0: at most this many buckets per set, fitted to the
      sampled size distribution (`padding.fitted_buckets`); 0: geometric.

  Returns:
    `padding.EpisodeBuckets`; `num_programs` bounds the compiled shapes.
  """
  sources = _make_sources(_as_spec_list(dataset_specs), split,
                          episode_config, 0, use_dag_ontology,
                          use_bilevel_ontology)
  return padding.buckets_for_samplers([s.sampler for s in sources],
                                      pad_multiple, bucket_growth,
                                      min_bucket_size, num_buckets)


def _pack(images: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
  """One buffer and the lengths: much cheaper to hand to TF than a list."""
  return b"".join(images), np.array([len(x) for x in images], np.int64)


def _unpack(blob, lengths):
  """Inverse of `_pack`, in TF: a [N] string tensor."""
  starts = tf.cumsum(lengths, exclusive=True)
  # `substr` broadcasts the scalar buffer; tiling it first would copy the
  # whole buffer once per image.
  return tf.strings.substr(blob, starts, lengths)


def _row_block(num_support, num_rows, s_pad, q_pad, row_block):
  """Indices (into support-then-query rows) of one block of the padded sets.

  Block `b` of `n` holds `padding.row_block` of the padded support set and of
  the padded query set; only the real rows among them exist here.
  """
  b, n = row_block
  support_rows = padding.row_block(s_pad, b, n)
  query_rows = padding.row_block(q_pad, b, n)
  num_query = num_rows - num_support
  support = [r for r in support_rows if r < num_support]
  query = [num_support + r for r in query_rows if r < num_query]
  return support + query, len(support), len(support_rows), len(query_rows)


def _episode_generator(sources, seed, buckets, shuffle_buffer_size,
                       simclr_episode_fraction=0.0, start_episode=0,
                       row_block=None, cache=None):
  """Returns a generator function yielding one packed episode at a time."""

  def generate():
    # Built here, not outside: every iteration of the dataset restarts from
    # the seed, as tf.data expects of a deterministic source.
    episodes = reader.EpisodeReader(sources, seed, shuffle_buffer_size)
    aug_rng = np.random.default_rng(reader.derive_seeds(seed, 3, count=2))
    if cache is not None:  # Cached images are not read again.
      episodes.skip_cached_reads(lambda *key: cache.is_filled(key))
    # Resume: the state after `start_episode` episodes, no image reads.
    # Augmentation seeds are drawn for the unconverted episode, as below.
    for _ in range(start_episode):
      aug_rng.integers(0, 2**31 - 1, size=(episodes.skip(), 2))
    index = start_episode
    while True:
      if cache is not None:
        cache.refresh_filled()
      ep = episodes.plan_episode()
      s_pad, q_pad = buckets.pick(ep.num_support, ep.num_query)
      # Which row of `ep` each output row shows (for errors, the cache and
      # which records to read).
      origin = np.arange(len(ep.class_ids))
      is_simclr = simclr_lib.is_simclr_episode(seed, index,
                                               simclr_episode_fraction)
      index += 1
      if is_simclr:  # Query size only shrinks: the buckets still fit.
        origin = np.asarray(simclr_lib.convert_episode(
            origin, ep.class_ids, ep.num_support)[0], np.int64)
      num_support = ep.num_support
      keep = None
      if row_block is not None:  # Only this block's rows are decoded.
        keep, num_support, s_pad, q_pad = _row_block(
            num_support, len(origin), s_pad, q_pad, row_block)
        origin = origin[keep]
      # Only the records of output rows are read: not those of other row
      # blocks, nor the query records a SimCLR episode replaces.
      ep = episodes.read_images(ep, origin)
      # Drawn for the unconverted episode, so conversion never shifts the
      # seeds of later episodes.
      aug_seeds = aug_rng.integers(0, 2**31 - 1, size=(len(ep.images), 2))
      images, labels, class_ids, num_ways = (ep.images, ep.labels,
                                             ep.class_ids, ep.num_ways)
      if is_simclr:
        images, labels, class_ids, num_ways = simclr_lib.convert_episode(
            images, class_ids, ep.num_support)
      aug_seeds = aug_seeds[:len(images)]
      if keep is not None:
        images = [images[i] for i in keep]
        labels, class_ids = labels[keep], class_ids[keep]
        aug_seeds = aug_seeds[keep]
      blob, lengths = _pack(images)
      yield {
          "blob": blob, "lengths": lengths, "labels": labels,
          "class_ids": class_ids,
          "info": np.array([num_support, s_pad, q_pad, num_ways,
                            ep.source_id], dtype=np.int32),
          "aug_seeds": aug_seeds.reshape(-1, 2),
          "simclr": np.bool_(is_simclr),
          **_provenance(sources, ep, origin, cache),
      }

  return _EXIT_GUARD.wrap(generate)


_EPISODE_SIGNATURE = {
    "blob": tf.TensorSpec([], tf.string),
    "lengths": tf.TensorSpec([None], tf.int64),
    "labels": tf.TensorSpec([None], tf.int32),
    "class_ids": tf.TensorSpec([None], tf.int32),
    "info": tf.TensorSpec([5], tf.int32),
    "aug_seeds": tf.TensorSpec([None, 2], tf.int64),
    "simclr": tf.TensorSpec([], tf.bool),
    "record_index": tf.TensorSpec([None], tf.int32),
    "row_files": tf.TensorSpec([None], tf.string),
    "cache_slots": tf.TensorSpec([None], tf.int32),
}


def _provenance(sources, ep, origin, cache):
  """Where each output row's image comes from (for errors), its cache slot.

  Args:
    sources: the pipeline's sources.
    ep: the `reader.Episode` read.
    origin: [N] the row of `ep` each output row shows.
    cache: the decoded-image cache or None.
  """
  spec = sources[ep.source_id].spec
  records = ep.record_index[origin].astype(np.int32)
  class_ids = ep.class_ids[origin]
  if cache is None:
    slots = np.full(len(origin), -1, np.int32)
  else:
    slots = np.asarray(cache.slots(list(zip(
        itertools.repeat(ep.source_id), class_ids.tolist(),
        records.tolist()))), np.int32).reshape(-1)
  files = {c: spec.class_file(int(c)) for c in set(class_ids.tolist())}
  return {"record_index": records,
          "row_files": np.array([files[c] for c in class_ids.tolist()],
                                dtype=object).reshape(-1),
          "cache_slots": slots}


def _describe_row(files, records, class_ids):
  """`describe` of `decoder.decode_rows`: row -> "<file>: record R of
  class C: the image failed to decode ..." (files: [N] string; records,
  class_ids: [N] int32)."""

  def describe(i):
    return tf.strings.join([
        files[i], ": record ", tf.strings.as_string(records[i]),
        " of class ", tf.strings.as_string(class_ids[i]),
        ": the image failed to decode (corrupt image data)"])

  return describe


def _pad_rows(x, size, value):
  pad = [[0, size - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, pad, constant_values=value)


def _episode_fn(image_size, support_augmentation, query_augmentation,
                episode_augmenter=None, cache=None):
  """Per-episode map: decode every image once, augment, pad, add masks.

  `episode_augmenter` (a `simclr.EpisodeAugmenter`) augments SimCLR and
  ordinary episodes after the decoder's own augmentation.
  """
  extra = episode_augmenter if (episode_augmenter and
                                episode_augmenter.augments_in_map) else None

  def decode_padded(ep, rows, size, augmentation, is_query):
    """[size, H, W, 3]: decoded images, then zero rows up to `size`."""
    images = _unpack(ep["blob"], ep["lengths"])[rows]
    describe = _describe_row(ep["row_files"][rows], ep["record_index"][rows],
                             ep["class_ids"][rows])
    more = None
    if extra is not None:
      more = lambda image, seed: extra(image, seed, is_query, ep["simclr"])
    return decoder.decode_rows(images, size, image_size, augmentation,
                               ep["aug_seeds"][rows], describe, cache,
                               ep["cache_slots"][rows], more)

  def process(ep):
    num_support, s_pad, q_pad = ep["info"][0], ep["info"][1], ep["info"][2]
    out = {}
    for prefix, rows, size, aug in (
        ("support_", slice(None, num_support), s_pad, support_augmentation),
        ("query_", slice(num_support, None), q_pad, query_augmentation)):
      labels = ep["labels"][rows]
      out[prefix + "images"] = decode_padded(ep, rows, size, aug,
                                             prefix == "query_")
      out[prefix + "labels"] = _pad_rows(labels, size, 0)
      out[prefix + "mask"] = tf.range(size) < tf.shape(labels)[0]
      out[prefix + "class_ids"] = _pad_rows(ep["class_ids"][rows], size, -1)
      if episode_augmenter is not None:  # Only with on-device augmentation.
        out.update(episode_augmenter.device_fields(
            prefix, ep["aug_seeds"][rows], tf.shape(labels)[0], size,
            ep["simclr"]))
    out["num_ways"] = ep["info"][3]
    out["source_id"] = ep["info"][4]
    return out

  return process


def _episode_dataset(specs, split, episode_config, image_size, seed, *,
                     pad_multiple, bucket_growth, min_bucket_size,
                     num_buckets,
                     shuffle_buffer_size, support_augmentation,
                     query_augmentation, use_dag_ontology,
                     use_bilevel_ontology, process_index, process_count,
                     num_parallel_calls, prefetch, simclr_augmentation=None,
                     md_augmentation=None, augment_on_device=False,
                     start_episode=0, row_block=None, decoded_cache_bytes=0,
                     buckets: padding.EpisodeBuckets | None = None):
  """Shared body of the one-source and multi-source builders."""
  if not specs:
    raise ValueError("at least one dataset spec is needed")
  augmenter = simclr_lib.EpisodeAugmenter(
      simclr_augmentation, episode_config.simclr_episode_fraction,
      md_augmentation, on_host=not augment_on_device)
  seed = _process_seed(seed, process_index, process_count)
  sources = _make_sources(specs, split, episode_config, seed,
                          use_dag_ontology, use_bilevel_ontology)
  for source in sources:  # Fail now, not on the first episode.
    reader.check_class_files(source.spec, source.split)
  if buckets is None:
    buckets = padding.buckets_for_samplers(
        [s.sampler for s in sources], pad_multiple, bucket_growth,
        min_bucket_size, num_buckets)
  if start_episode < 0:
    raise ValueError(f"start_episode={start_episode} must be >= 0")
  if row_block is not None:
    block, count = row_block
    if not 0 <= block < count or pad_multiple % count:
      raise ValueError(
          f"row_block={row_block}: needs 0 <= block < count and a "
          f"pad_multiple ({pad_multiple}) divisible by count")
  cache = None
  capacity = min(
      decoded_cache_bytes // decoder.DecodedImageCache.bytes_per_image(
          image_size),
      sum(s.spec.get_total_images_per_class(c) for s in sources
          for c in s.class_set))
  if capacity > 0:
    cache = decoder.DecodedImageCache(capacity, image_size)
  episodes = tf.data.Dataset.from_generator(
      _episode_generator(sources, seed, buckets, shuffle_buffer_size,
                         episode_config.simclr_episode_fraction,
                         start_episode, row_block, cache),
      output_signature=_EPISODE_SIGNATURE)
  # Episodes decode in parallel with each other.
  episodes = episodes.map(
      _episode_fn(image_size, support_augmentation, query_augmentation,
                  augmenter, cache),
      num_parallel_calls=num_parallel_calls)
  return episodes.prefetch(prefetch)


def make_one_source_episode_dataset(
    dataset_spec, split, episode_config: sampling.EpisodeDescriptionConfig,
    image_size: int, seed: int = 0, *, pad_multiple: int = 1,
    bucket_growth: float = padding.DEFAULT_GROWTH,
    min_bucket_size: int = padding.DEFAULT_MIN_SIZE,
    num_buckets: int = 0,
    shuffle_buffer_size: int = reader.DEFAULT_SHUFFLE_BUFFER_SIZE,
    support_augmentation: decoder.DataAugmentation | None = None,
    query_augmentation: decoder.DataAugmentation | None = None,
    use_dag_ontology: bool | None = None,
    use_bilevel_ontology: bool | None = None, process_index: int = 0,
    process_count: int = 1, num_parallel_calls: int = AUTOTUNE,
    prefetch: int = 2,
    simclr_augmentation: simclr_lib.SimCLRAugmentation | None = None,
    md_augmentation: simclr_lib.SimCLRAugmentation | None = None,
    augment_on_device: bool = False,
    start_episode: int = 0,
    row_block: tuple[int, int] | None = None,
    decoded_cache_bytes: int = 0,
    buckets: padding.EpisodeBuckets | None = None) -> tf.data.Dataset:
  """Infinite dataset of padded episodes from one source.

  `episode_config.simclr_episode_fraction` of the episodes are SimCLR
  episodes (see `simclr.py`, which also says what their rows hold).

  Args:
    dataset_spec: from `load_dataset_spec`; its `path` holds the records.
    split: a `Split` or its name.
    episode_config: an `EpisodeDescriptionConfig`.
    image_size: output height and width.
    seed: seeds sampling, class shuffles and augmentation.
    pad_multiple: padded support/query sizes are multiples of this.
    bucket_growth: ratio between padding buckets (see `padding.py`).
    min_bucket_size: smallest padding bucket of a variable size.
    num_buckets: > 0: at most this many buckets for the support set and
      for the query set, fitted to the sampler's size distribution for the
      least expected padding (`padding.fitted_buckets`); 0: geometric
      buckets (`bucket_growth`, `min_bucket_size`).
    shuffle_buffer_size: per-class shuffle buffer bound (upstream: 1000).
    support_augmentation: `DataAugmentation` for support images, or None.
    query_augmentation: `DataAugmentation` for query images, or None.
    use_dag_ontology: None: decided by the spec type and config.
    use_bilevel_ontology: None: decided by the spec type and config.
    process_index: this process's index (folded into the seed).
    process_count: number of processes.
    num_parallel_calls: decode parallelism.
    prefetch: episodes prefetched.
    simclr_augmentation: augmentation of SimCLR episodes (None: the official
      SimCLR v1 settings, `simclr.SIMCLR_AUGMENTATION`).
    md_augmentation: augmentation of the ordinary episodes' images, e.g.
      `simclr.BOHB_AUGMENTATION`; None: none.
    augment_on_device: leave SimCLR / md augmentation to the accelerator
      (`ctx_jax.data.augment`): images come out unaugmented, with extra
      keys `{support,query}_aug_seeds` and `_aug_mode` (see
      `simclr.EpisodeAugmenter.device_fields`).
    start_episode: begin at this episode of the seeded stream, exactly as
      if the earlier ones had been read (resuming training at a data
      position); the skipped episodes are sampled but not read.
    row_block: `(index, count)`: emit only block `index` of `count` equal
      blocks of the padded support rows and of the padded query rows (the
      rows one process feeds to its devices when an episode is split over
      processes). Every process uses the same seed; only its own images are
      read and decoded. `pad_multiple` must be divisible by `count`.
    decoded_cache_bytes: memory for a cache of decoded, resized images
      (`decoder.DecodedImageCache`, float32, before augmentation); 0: none.
      Exact: cached images are the same values. Images past the budget are
      decoded every time. E.g. all 5640 DTD images at 84x84 take 477 MB.
    buckets: the padded shapes to use instead of buckets fitted to these
      samplers (`pad_multiple`, `bucket_growth`, `min_bucket_size` and
      `num_buckets` are then not used for padding), e.g. buckets shared by
      several sources and splits; every episode must fit them.

  Returns:
    A `tf.data.Dataset` of episode dicts (see module docstring).
  """
  return _episode_dataset(
      [dataset_spec], split, episode_config, image_size, seed,
      pad_multiple=pad_multiple, bucket_growth=bucket_growth,
      min_bucket_size=min_bucket_size, num_buckets=num_buckets,
      shuffle_buffer_size=shuffle_buffer_size,
      support_augmentation=support_augmentation,
      query_augmentation=query_augmentation,
      use_dag_ontology=use_dag_ontology,
      use_bilevel_ontology=use_bilevel_ontology,
      process_index=process_index, process_count=process_count,
      num_parallel_calls=num_parallel_calls, prefetch=prefetch,
      simclr_augmentation=simclr_augmentation,
      md_augmentation=md_augmentation, augment_on_device=augment_on_device,
      start_episode=start_episode, row_block=row_block,
      decoded_cache_bytes=decoded_cache_bytes, buckets=buckets)


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
      min_bucket_size=padding.DEFAULT_MIN_SIZE, num_buckets=0,
      shuffle_buffer_size=reader.DEFAULT_SHUFFLE_BUFFER_SIZE,
      support_augmentation=None,
      query_augmentation=None, use_dag_ontology=None,
      use_bilevel_ontology=None, process_index=0, process_count=1,
      num_parallel_calls=AUTOTUNE, prefetch=2, simclr_augmentation=None,
      md_augmentation=None, augment_on_device=False, start_episode=0,
      row_block=None, decoded_cache_bytes=0, buckets=None)
  unknown = set(kwargs) - set(options)
  if unknown:
    raise TypeError(f"unexpected arguments {sorted(unknown)}")
  options.update(kwargs)
  return _episode_dataset(list(dataset_spec_list), split, episode_config,
                          image_size, seed, **options)

