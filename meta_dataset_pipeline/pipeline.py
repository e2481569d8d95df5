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
from meta_dataset_pipeline import episode_map
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import reader
from meta_dataset_pipeline import sampling
from meta_dataset_pipeline import simclr as simclr_lib
from meta_dataset_pipeline import workers as workers_lib

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


class EpisodePlanner:
  """The serial part of an episode stream: what episode i is, not its pixels.

  For each episode, in order, it samples the description, takes record
  indices from the per-class shuffled streams, picks the padded sizes, the
  SimCLR flag and the augmentation seeds, and keeps this process's row
  block. Everything random about episode i happens here, in one thread, so
  episode i is the same whoever reads and decodes it (this process, or any
  of the worker processes of `workers.py`) and however many there are.
  No record is read: planning costs about a millisecond per ILSVRC episode.

  `next()` returns `(plan, episode, origin)`: `plan` is the episode's
  description for the decoder (the `episode_map.EPISODE_SIGNATURE` fields
  except the image bytes), `episode` the `reader.Episode` planned and `origin` the row
  of `episode` each output row shows.
  """

  def __init__(self, sources, seed, buckets, shuffle_buffer_size,
               simclr_episode_fraction=0.0, start_episode=0, row_block=None,
               cache=None):
    self.sources = sources
    self._seed = seed
    self._buckets = buckets
    self._fraction = simclr_episode_fraction
    self._row_block = row_block
    self._cache = cache
    self.reader = reader.EpisodeReader(sources, seed, shuffle_buffer_size)
    self._aug_rng = np.random.default_rng(
        reader.derive_seeds(seed, 3, count=2))
    if cache is not None:  # Cached images are not read again.
      self.reader.skip_cached_reads(lambda *key: cache.is_filled(key))
    # Resume: the state after `start_episode` episodes, no record read.
    # Augmentation seeds are drawn for the unconverted episode, as below.
    for _ in range(start_episode):
      self._aug_rng.integers(0, 2**31 - 1, size=(self.reader.skip(), 2))
    self.index = start_episode

  def next(self):
    """The plan of the next episode (see the class docstring)."""
    if self._cache is not None:
      self._cache.refresh_filled()
    ep = self.reader.plan_episode()
    s_pad, q_pad = self._buckets.pick(ep.num_support, ep.num_query)
    # Which row of `ep` each output row shows (for errors, the cache and
    # which records to read).
    origin = np.arange(len(ep.class_ids))
    is_simclr = simclr_lib.is_simclr_episode(self._seed, self.index,
                                             self._fraction)
    self.index += 1
    labels, class_ids, num_ways = ep.labels, ep.class_ids, ep.num_ways
    if is_simclr:  # Query size only shrinks: the buckets still fit.
      converted, labels, class_ids, num_ways = simclr_lib.convert_episode(
          list(origin), ep.class_ids, ep.num_support)
      origin = np.asarray(converted, np.int64)
    # Drawn for the unconverted episode, so conversion never shifts the
    # seeds of later episodes.
    aug_seeds = self._aug_rng.integers(0, 2**31 - 1,
                                       size=(len(ep.class_ids), 2))
    aug_seeds = aug_seeds[:len(origin)]
    num_support = ep.num_support
    if self._row_block is not None:  # Only this block's rows are decoded.
      keep, num_support, s_pad, q_pad = _row_block(
          num_support, len(origin), s_pad, q_pad, self._row_block)
      origin = origin[keep]
      labels, class_ids = labels[keep], class_ids[keep]
      aug_seeds = aug_seeds[keep]
    plan = {
        "labels": np.asarray(labels, np.int32),
        "class_ids": np.asarray(class_ids, np.int32),
        "info": np.array([num_support, s_pad, q_pad, num_ways,
                          ep.source_id], dtype=np.int32),
        "aug_seeds": aug_seeds.reshape(-1, 2),
        "simclr": np.bool_(is_simclr),
        **_provenance(self.sources, ep, origin, self._cache),
    }
    return plan, ep, origin

  def read(self, ep, origin) -> list[bytes]:
    """The encoded images of the output rows, read in this process."""
    # Only the records of output rows are read: not those of other row
    # blocks, nor the query records a SimCLR episode replaces.
    ep = self.reader.read_images(ep, origin)
    return [ep.images[i] for i in origin.tolist()]


def _episode_generator(sources, seed, buckets, shuffle_buffer_size,
                       simclr_episode_fraction=0.0, start_episode=0,
                       row_block=None, cache=None):
  """Returns a generator function yielding one packed episode at a time
  (planned and read in this process: `num_workers=0`)."""

  def generate():
    # Built here, not outside: every iteration of the dataset restarts from
    # the seed, as tf.data expects of a deterministic source.
    planner = EpisodePlanner(sources, seed, buckets, shuffle_buffer_size,
                             simclr_episode_fraction, start_episode,
                             row_block, cache)
    while True:
      plan, ep, origin = planner.next()
      blob, lengths = episode_map.pack(planner.read(ep, origin))
      yield {"blob": blob, "lengths": lengths, **plan}

  return _EXIT_GUARD.wrap(generate)


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


def _episode_dataset(specs, split, episode_config, image_size, seed, *,
                     pad_multiple, bucket_growth, min_bucket_size,
                     num_buckets,
                     shuffle_buffer_size, support_augmentation,
                     query_augmentation, use_dag_ontology,
                     use_bilevel_ontology, process_index, process_count,
                     num_parallel_calls, prefetch, simclr_augmentation=None,
                     md_augmentation=None, augment_on_device=False,
                     start_episode=0, row_block=None, decoded_cache_bytes=0,
                     buckets: padding.EpisodeBuckets | None = None,
                     num_workers=0):
  """Shared body of the one-source and multi-source builders (a dataset),
  and of `make_episode_iterator` (`num_workers` > 0: worker processes)."""
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
    if num_workers:
      raise ValueError(
          "decoded_cache_bytes (config.data.decoded_cache_mb) works with "
          "in-process decoding only: set num_workers=0 or the cache to 0")
    cache = decoder.DecodedImageCache(capacity, image_size)
  if num_workers:
    if any(hasattr(s.spec, "open_class_streams") for s in sources):
      raise ValueError(
          "num_workers > 0 reads class record files; TFDS-prepared data "
          "(config.data.format='tfds') needs num_workers=0")
    planner = EpisodePlanner(sources, seed, buckets, shuffle_buffer_size,
                             episode_config.simclr_episode_fraction,
                             start_episode, row_block)
    setup = workers_lib.WorkerSetup(image_size, support_augmentation,
                                    query_augmentation, augmenter)
    largest = (max(s + q for s, q in buckets.pairs) if buckets.pairs
               else max(buckets.support) + max(buckets.query))
    return workers_lib.EpisodeWorkers(planner, setup, num_workers,
                                      window=2 * num_workers + prefetch,
                                      max_rows=largest)
  episodes = tf.data.Dataset.from_generator(
      _episode_generator(sources, seed, buckets, shuffle_buffer_size,
                         episode_config.simclr_episode_fraction,
                         start_episode, row_block, cache),
      output_signature=episode_map.EPISODE_SIGNATURE)
  # Episodes decode in parallel with each other.
  episodes = episodes.map(
      episode_map.episode_fn(image_size, support_augmentation,
                             query_augmentation, augmenter, cache),
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


_DEFAULT_OPTIONS = dict(
    pad_multiple=1, bucket_growth=padding.DEFAULT_GROWTH,
    min_bucket_size=padding.DEFAULT_MIN_SIZE, num_buckets=0,
    shuffle_buffer_size=reader.DEFAULT_SHUFFLE_BUFFER_SIZE,
    support_augmentation=None,
    query_augmentation=None, use_dag_ontology=None,
    use_bilevel_ontology=None, process_index=0, process_count=1,
    num_parallel_calls=AUTOTUNE, prefetch=2, simclr_augmentation=None,
    md_augmentation=None, augment_on_device=False, start_episode=0,
    row_block=None, decoded_cache_bytes=0, buckets=None)


def _with_defaults(kwargs) -> dict:
  """The keyword options of the builders, defaults filled in."""
  unknown = set(kwargs) - set(_DEFAULT_OPTIONS)
  if unknown:
    raise TypeError(f"unexpected arguments {sorted(unknown)}")
  return {**_DEFAULT_OPTIONS, **kwargs}


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
  options = _with_defaults(kwargs)
  return _episode_dataset(list(dataset_spec_list), split, episode_config,
                          image_size, seed, **options)


def make_episode_iterator(dataset_spec_list, split, episode_config,
                          image_size, seed=0, *, num_workers: int = 0,
                          **kwargs):
  """Iterator of numpy episodes, from this process or from worker processes.

  The same episodes, bit for bit, whatever `num_workers` (tested).

  Args:
    dataset_spec_list: one spec or a list of specs (`source_id` indexes it).
    split: the split.
    episode_config: an `EpisodeDescriptionConfig`.
    image_size: output height and width.
    seed: seeds everything, as in `make_one_source_episode_dataset`.
    num_workers: 0: the tf.data pipeline of this process
      (`as_numpy_iterator` of `make_multisource_episode_dataset`); K > 0:
      the episodes are planned here and read, decoded and padded by K
      worker processes (`workers.py`), then handed over without a copy.
      `workers.default_num_workers()` is a good K. Class record files only
      (not TFDS-prepared data), without `decoded_cache_bytes`.
    **kwargs: the keyword options of `make_one_source_episode_dataset`;
      `prefetch` is the number of episodes prepared ahead beyond two per
      worker (one decoding, one being read).

  Returns:
    An iterator of episode dicts; with workers, its arrays are views of
    shared memory that is reused once the episode's arrays are all gone,
    and `close()` stops the workers (also done at exit).
  """
  specs = _as_spec_list(dataset_spec_list)
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers} must be >= 0")
  if not num_workers:
    return make_multisource_episode_dataset(
        specs, split, episode_config, image_size, seed,
        **kwargs).as_numpy_iterator()
  options = _with_defaults(kwargs)
  return _episode_dataset(specs, split, episode_config, image_size, seed,
                          num_workers=num_workers, **options)
