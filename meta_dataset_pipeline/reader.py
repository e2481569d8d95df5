"""Reading class records, and planning which records each episode takes.

Official semantics mirrored (`meta_dataset/data/reader.py`):

- Each class of a source is one TFRecord file, read as its own stream: the
  records are shuffled with a buffer of `min(#images, shuffle_buffer_size)`
  (upstream default 1000; issue google-research/meta-dataset#54 shows why
  leaving them unshuffled biases results), pass after pass, reshuffling each
  pass. With a buffer holding the whole class this is a uniform permutation;
  with a smaller one it is the same partial shuffle as `tf.data`'s buffer.
- Episodes take their examples from the class streams in order. When an
  episode needs more examples of a class than remain in the current pass, the
  rest of the pass is dropped ("flushed") and a fresh pass starts, so an
  example never appears twice in one episode and every example of a pass is
  used before any is reused.

How it is done differs, for speed and memory: upstream builds one
`TFRecordDataset` + `shuffle` per class (about 20 ms each to build, so tens
of seconds for ImageNet, and up to 1000 buffered records per class), reads
flushed records to throw them away, and pads every episode with placeholder
pulls. Here start-up does not depend on the number of records: when the
pipeline is built, every class file of the split is only checked cheaply
(`record_files.check_class_files`: it exists, has room for the spec's
count, ends with a complete record). A class file is indexed when a
record of it is first read (record offsets from the 12-byte record headers; a
record count that differs from the spec's fails then), and every record's
CRCs are verified when it is read. The shuffle is done on record *indices*
in numpy, and only the records an episode keeps are read, by offset (at
most 256 files open at a time; from URL file systems in several threads).
Files are opened through `files`, so records may sit on any `tf.io.gfile`
file system (`gs://`, ...).

Bad data fails loudly, naming the file: a missing class file or one cut
off at a random byte (when the pipeline is built), a record count that
differs from the spec's (when a record of the class is first read), a corrupt
record, an image that is not one (when read). An image whose bytes look
fine but fail to decode is named by `decoder.decode_rows`.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import threading
import weakref
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import decoder
from meta_dataset_pipeline import files
from meta_dataset_pipeline import record_files
from meta_dataset_pipeline import sampling
# Re-exported: the reader's errors and checks live in `record_files`.
from meta_dataset_pipeline.record_files import _INDEX_CACHE  # pylint: disable=unused-import
from meta_dataset_pipeline.record_files import check_class_files
from meta_dataset_pipeline.record_files import check_record_count
from meta_dataset_pipeline.record_files import check_sources  # pylint: disable=unused-import
from meta_dataset_pipeline.record_files import index_records  # pylint: disable=unused-import
from meta_dataset_pipeline.record_files import RecordError

DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
# Threads reading an episode's records from URL file systems (buckets),
# where each read waits on a request (see `EpisodeReader`). Local files are
# read serially: with the page cache warm, threads only contend for the GIL
# (12% slower on 127 KB records; 1.3-1.7x faster on a cold disk; see
# `benchmarks/RESULTS.md`).
DEFAULT_URL_READ_THREADS = 8


def buffer_shuffle_order(num: int, buffer_size: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Order in which a shuffle buffer of `buffer_size` emits `num` items.

  Same distribution as `tf.data.Dataset.shuffle`: fill the buffer, then
  repeatedly emit a uniformly chosen buffered item and refill its slot from
  the input. A buffer holding everything gives a uniform permutation.

  Args:
    num: number of items, read in order 0..num-1.
    buffer_size: buffer size (<= 1: no shuffling).
    rng: random generator.

  Returns:
    int64 permutation of range(num).
  """
  if buffer_size <= 1 or num <= 1:
    return np.arange(num, dtype=np.int64)
  if buffer_size >= num:
    return rng.permutation(num)
  buffer = list(range(buffer_size))
  picks = rng.random(num)
  order = np.empty(num, dtype=np.int64)
  next_in = buffer_size
  for i in range(num):
    j = int(picks[i] * len(buffer))
    order[i] = buffer[j]
    if next_in < num:
      buffer[j] = next_in
      next_in += 1
    else:
      buffer[j] = buffer[-1]
      buffer.pop()
  return order


class OpenFiles:
  """Keeps at most `limit` class files open (ImageNet alone has 1000).

  Holds its streams weakly: streams refer to it, and a reference cycle would
  leave their files to the garbage collector, which may finalize a file
  before the stream that would close it (an "unclosed file" warning).
  """

  def __init__(self, limit: int = 256):
    self._limit = limit
    self._open = collections.OrderedDict()
    self._lock = threading.Lock()

  def touch(self, stream: "ClassStream"):
    with self._lock:
      self._open[id(stream)] = weakref.ref(stream)
      self._open.move_to_end(id(stream))
      evicted = []
      while len(self._open) > self._limit:
        evicted.append(self._open.popitem(last=False)[1]())
    # Closed outside this lock: `close` takes the stream's own lock, and a
    # reader holding that one never waits for this one.
    for oldest in evicted:
      if oldest is not None:
        oldest.close()


class ClassStream:
  """One class's records, pass after pass, each pass reshuffled.

  The file is indexed on first use; its record count must equal the spec's.
  """

  def __init__(self, path: str, num_records: int, class_id: int,
               rng: np.random.Generator, shuffle_buffer_size: int,
               open_files: "OpenFiles | None" = None):
    self._open_files = open_files
    self.path = path
    self.num_records = num_records
    self.class_id = class_id
    self._rng = rng
    self._buffer = min(num_records, shuffle_buffer_size or 0)
    self._offsets = None
    self._order = np.zeros(0, dtype=np.int64)
    self._cursor = 0
    self._reader = None
    # Reads of one class file are serialized (seek + read on one handle);
    # reads of different classes run in parallel (`EpisodeReader`).
    self._lock = threading.Lock()
    # Optional (class_id, index) -> bool: records whose decoded image is
    # cached downstream are not read (`EpisodeReader.skip_cached_reads`).
    self.cached = None

  def ensure_open(self):
    """Indexes the file (once) and checks its record count."""
    if self._offsets is None:
      self._offsets = check_record_count(self.path, self.num_records,
                                         self.class_id)

  def close(self):
    """Closes the file; the next read reopens it."""
    lock = getattr(self, "_lock", None)
    if lock is None:  # __init__ did not finish.
      return
    with lock:
      if self._reader is not None:
        self._reader.close()
        self._reader = None

  def __del__(self):
    # Streams die with their (abandoned) tf.data iterator; close quietly.
    self.close()

  def take(self, count: int) -> tuple[np.ndarray, int]:
    """Indices of the next `count` records, and how many were flushed."""
    if count > self.num_records:
      raise ValueError(f"{self.path}: {count} examples requested from a "
                       f"class of {self.num_records}")
    # No file access: the planner only needs the spec's count (the file's
    # own count is checked when a record is first read), so planning and
    # resuming read nothing.
    left = len(self._order) - self._cursor
    flushed = 0
    if count > left:
      flushed = left
      self._order = buffer_shuffle_order(self.num_records, self._buffer,
                                         self._rng)
      self._cursor = 0
    picked = self._order[self._cursor:self._cursor + count]
    self._cursor += count
    return picked, flushed

  def read(self, index: int) -> bytes:
    """The serialized record number `index` of the file, CRCs verified."""
    self.ensure_open()
    if self._open_files is not None:
      self._open_files.touch(self)
    offset = int(self._offsets[index])
    try:
      with self._lock:
        if self._reader is None:
          self._reader = files.open_binary(self.path)
        return record_files.read_record(self._reader, offset)
    except ValueError as e:
      raise RecordError(
          f"{self.path}: record {index} (byte {offset}) of class "
          f"{self.class_id} is corrupt: {e}") from None

  def read_image(self, index: int) -> bytes:
    """The encoded image of record `index`, checked (see `checked_image`).

    Empty when `self.cached` says the decoded image is cached (the record
    was read and checked when it was first used).
    """
    if self.cached is not None and self.cached(self.class_id, index):
      return b""
    return checked_image(self.read(index), self.path, index, self.class_id)


def checked_image(record, path: str, index: int, class_id: int) -> bytes:
  """The encoded image of a class file's record, or a `RecordError`.

  The record must be a `tf.train.Example` of the class's label whose image
  bytes look complete (`decoder.image_bytes_problem`). The error names the
  file, the record and the class.
  """
  where = f"{path}: record {index} of class {class_id}"
  try:
    image, label = decoder.parse_record(record)
  except ValueError as e:
    raise RecordError(f"{where}: {e}") from None
  if label != class_id:
    raise RecordError(f"{where} has label {label}; records of a class "
                      "file must carry its class id")
  problem = decoder.image_bytes_problem(image)
  if problem:
    raise RecordError(f"{where}: {problem}")
  return image


def open_class_streams(spec, split, rngs, shuffle_buffer_size: int,
                       open_files: "OpenFiles | None" = None) -> list:
  """One stream per class of `split`, in class order, after checks.

  From the class record files, or from the spec's own data when it has
  some (`open_class_streams` of a TFDS-backed spec, `tfds_source.py`).

  Args:
    spec: a dataset spec.
    split: the split.
    rngs: one `np.random.Generator` per class (shuffles its passes).
    shuffle_buffer_size: per-class shuffle buffer bound.
    open_files: bound on open class files (files only).
  """
  own = getattr(spec, "open_class_streams", None)
  if own is not None:
    return own(split, rngs, shuffle_buffer_size)
  paths = check_class_files(spec, split)
  return [ClassStream(p, spec.get_total_images_per_class(c), c, rng,
                      shuffle_buffer_size, open_files)
          for p, c, rng in zip(paths, spec.get_classes(split), rngs)]


def derive_seeds(seed, *keys, count: int) -> np.ndarray:
  """`count` int64 seeds derived from `seed` and integer `keys`."""
  entropy = [int(s) for s in np.atleast_1d(seed)]
  seq = np.random.SeedSequence(entropy + [int(k) for k in keys])
  return seq.generate_state(count, np.uint64).astype(np.int64) & (2**62 - 1)


@dataclasses.dataclass
class Source:
  """One split of one source: its spec and sampler."""
  spec: object
  split: spec_lib.Split
  sampler: sampling.EpisodeDescriptionSampler

  @property
  def class_set(self) -> range:
    return self.spec.get_classes(self.split)


@dataclasses.dataclass
class Episode:
  """The images of one episode, support rows first, then query rows."""
  images: list[bytes] | None  # None: planned, not read yet.
  labels: np.ndarray          # int32: way index 0..ways-1.
  class_ids: np.ndarray       # int32: absolute class id.
  record_index: np.ndarray    # int32: record number in its class file.
  num_support: int
  num_query: int
  num_ways: int
  source_id: int
  num_flushed: int
  description: sampling.EpisodeDescription


class EpisodeReader:
  """Samples descriptions and reads their records from the class streams."""

  def __init__(self, sources: Sequence[Source], seed,
               shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
               read_threads: int | None = None):
    """Reader of `sources`' episodes.

    Args:
      sources: the sources.
      seed: the episode seed.
      shuffle_buffer_size: per-class shuffle buffer.
      read_threads: threads reading an episode's records; None: 1 for
        local files, `DEFAULT_URL_READ_THREADS` for URL file systems.
    """
    self.sources = list(sources)
    if read_threads is None:
      # Class files only: other streams (TFDS-backed specs) read serially.
      remote = any(not hasattr(s.spec, "open_class_streams") and
                   files.is_url(s.spec.path) for s in self.sources)
      read_threads = DEFAULT_URL_READ_THREADS if remote else 1
    # Reads run in threads, one task per class of an episode: file reads
    # release the GIL, so a bucket (or cold disk) serves several at once.
    self._pool = None
    if read_threads > 1:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          read_threads, thread_name_prefix="md-record-read")
    self._rng = np.random.default_rng(derive_seeds(seed, 1, count=2))
    self._streams = []
    open_files = OpenFiles()
    for i, s in enumerate(self.sources):
      seeds = derive_seeds(seed, 4, i, count=len(s.class_set))
      self._streams.append(open_class_streams(
          s.spec, s.split, [np.random.default_rng(int(k)) for k in seeds],
          shuffle_buffer_size, open_files))
    self._descriptions = [
        sampling.description_stream(s.sampler, self._rng)
        for s in self.sources]
    self._stream_by_class = [{st.class_id: st for st in streams}
                             for streams in self._streams]

  def _plan(self):
    """Samples the next description and takes its records from the streams.

    Everything random about an episode happens here; reading the records
    afterwards is deterministic. So `skip` (plan without reading) leaves the
    reader in exactly the state `next_episode` would have.
    """
    source_id = (int(self._rng.integers(len(self.sources)))
                 if len(self.sources) > 1 else 0)
    streams = self._streams[source_id]
    d = next(self._descriptions[source_id])
    support, query, flushed = [], [], 0
    for rel, k_s, k_q in zip(d.class_ids, d.num_support, d.num_query):
      stream = streams[rel]
      picked, num_flushed = stream.take(int(k_s + k_q))
      flushed += num_flushed
      support.append((stream, picked[:k_s]))
      query.append((stream, picked[k_s:]))
    return source_id, d, support, query, flushed

  def skip(self) -> int:
    """Advances past one episode without reading it; returns its size.

    Used to resume a stream at a given episode: no image is read, so
    skipping is cheap (sampling only), and the episodes that follow are the
    ones an uninterrupted stream would give.
    """
    _, d, _, _, _ = self._plan()
    return int(d.num_support.sum() + d.num_query.sum())

  def plan_episode(self) -> Episode:
    """The next episode (multi-source: source chosen uniformly), unread.

    Its `images` is None; `read_images` reads them. Planning is what
    advances the reader, so reading only some rows, or none, leaves the
    following episodes unchanged.
    """
    source_id, d, support, query, flushed = self._plan()
    index, class_ids, labels = [], [], []
    for part in (support, query):
      for way, (stream, picked) in enumerate(part):
        index.extend(picked)
        class_ids.extend([stream.class_id] * len(picked))
        labels.extend([way] * len(picked))
    return Episode(
        images=None, labels=np.array(labels, np.int32),
        class_ids=np.array(class_ids, np.int32),
        record_index=np.array(index, np.int32),
        num_support=int(d.num_support.sum()),
        num_query=int(d.num_query.sum()), num_ways=len(d.class_ids),
        source_id=source_id, num_flushed=flushed, description=d)

  def read_images(self, episode: Episode, rows=None) -> Episode:
    """`episode` (from `plan_episode`) with its images read.

    Args:
      episode: a planned episode of this reader.
      rows: optional indices of the rows whose records are needed; the
        other rows' images come back empty (b""), unread.
    """
    streams = self._stream_by_class[episode.source_id]
    wanted = np.ones(len(episode.class_ids), bool)
    if rows is not None:
      wanted[:] = False
      wanted[np.asarray(rows, np.int64)] = True
    by_class = {}  # class id -> [(row, record index)], in row order.
    for row, (c, i, w) in enumerate(zip(episode.class_ids.tolist(),
                                        episode.record_index.tolist(),
                                        wanted)):
      if w:
        by_class.setdefault(c, []).append((row, i))

    def read_class(class_id, rows):
      stream = streams[class_id]
      return [(row, stream.read_image(i)) for row, i in rows]

    if self._pool is None or len(by_class) < 2:
      done = [read_class(c, rows) for c, rows in by_class.items()]
    else:
      done = [f.result() for f in [self._pool.submit(read_class, c, rows)
                                   for c, rows in by_class.items()]]
    images = [b""] * len(wanted)
    for part in done:
      for row, image in part:
        images[row] = image
    return dataclasses.replace(episode, images=images)

  def next_episode(self) -> Episode:
    """Reads the next episode (multi-source: source chosen uniformly)."""
    return self.read_images(self.plan_episode())

  def skip_cached_reads(self, is_cached):
    """Stops reading records whose decoded image is cached downstream.

    Args:
      is_cached: (source_id, class_id, record index) -> bool; True only for
        images that the decoder will take from its cache (their bytes come
        back empty).
    """
    for source_id, streams in enumerate(self._streams):
      for stream in streams:
        stream.cached = functools.partial(is_cached, source_id)

