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
pulls. Here every class file of the split is indexed when the pipeline is
built (record offsets from the 12-byte record headers, so a record count
that differs from the spec's fails at once), and verified once, when first
used (one pass of TF's random-access record reader checks every CRC); the
shuffle is done on record
*indices* in numpy, and only the records an episode keeps are read, by
offset, with plain buffered I/O (at most 256 files open at a time).

Bad data fails loudly, naming the file: a missing class file, a truncated
file or a record count that differs from the spec's (these three when the
pipeline is built), a corrupt record, an image that is not one (when read).
An image whose bytes look fine but fail to decode is named by
`decoder.decode_rows`.
"""

import collections
import dataclasses
import functools
import os
import struct
import weakref
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import decoder
from meta_dataset_pipeline import sampling

try:  # TF's random-access reader verifies CRCs; private but stable in 2.x.
  from tensorflow.python.lib.io import _pywrap_record_io  # pylint: disable=g-import-not-at-top
  _RandomRecordReader = _pywrap_record_io.RandomRecordReader
except (ImportError, AttributeError):  # pragma: no cover
  _RandomRecordReader = None

DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
# TFRecord framing: uint64 length, uint32 masked CRC of the length, data,
# uint32 masked CRC of the data.
_HEADER_BYTES = 12
_FOOTER_BYTES = 4
_LENGTH = struct.Struct("<Q")
# `index_records` reads files up to this size whole, larger ones by seeking.
_READ_WHOLE_BYTES = 4 << 20


class RecordError(ValueError):
  """A class record file that does not match its spec or is damaged."""


def check_class_files(spec, split) -> list[str]:
  """Paths of the class files of `split`, checked against the spec.

  Every file must exist and hold as many records as the spec lists for its
  class. The record count comes from the record headers only
  (`index_records`, cached per file, so later checks and readers reuse it):
  about 0.2 s for 1000 files of 100 records in the page cache (measured on
  a loaded 2-core machine; see `benchmarks/RESULTS.md`). Record CRCs are
  checked later, when a class is first read.

  Args:
    spec: a dataset spec.
    split: the split to check.

  Returns:
    The file path of every class of the split, in class order.

  Raises:
    FileNotFoundError: the records folder or a class file is missing.
    NotImplementedError: sharded files (`{}_{}.tfrecords`), as upstream.
    RecordError: a file is truncated or holds a different number of records
      than the spec lists for its class.
  """
  own_check = getattr(spec, "check_split", None)
  if own_check is not None:  # Not class files (TFDS data: `tfds_source`).
    return own_check(split)
  if spec.file_pattern not in spec_lib.SUPPORTED_FILE_PATTERNS:
    raise NotImplementedError(
        f"{spec.name}: file_pattern {spec.file_pattern!r} (sharded class "
        "files) is not supported; one file per class is expected")
  if not os.path.isdir(spec.path):
    raise FileNotFoundError(
        f"records folder of '{spec.name}' not found: {spec.path}")
  paths = [spec.class_file(c) for c in spec.get_classes(split)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    split_name = spec_lib.as_split(split).name
    raise FileNotFoundError(
        f"{len(missing)} class record files of '{spec.name}' ({split_name}) "
        f"are missing, e.g. {', '.join(missing[:3])}")
  for path, class_id in zip(paths, spec.get_classes(split)):
    check_record_count(path, spec.get_total_images_per_class(class_id),
                       class_id)
  return paths


def check_record_count(path: str, num_records: int,
                       class_id: int) -> np.ndarray:
  """Record offsets of a class file whose count must be `num_records`.

  Args:
    path: the class's TFRecord file.
    num_records: the number of images the spec lists for the class.
    class_id: the class, for the error message.

  Returns:
    The record offsets (`index_records`).

  Raises:
    RecordError: the file is truncated or the counts differ.
  """
  offsets = index_records_cached(path)
  if len(offsets) != num_records:
    raise RecordError(
        f"{path}: the spec lists {num_records} images for class "
        f"{class_id} but the file holds {len(offsets)} records")
  return offsets


_INDEX_CACHE = {}


def index_records_cached(path: str) -> np.ndarray:
  """`index_records`, remembered per (path, size, modification time)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  offsets = _INDEX_CACHE.get(key)
  if offsets is None:
    offsets = index_records(path)
    _INDEX_CACHE[key] = offsets
  return offsets


def index_records(path: str) -> np.ndarray:
  """Byte offsets of the records of a TFRecord file (headers only).

  Args:
    path: an uncompressed TFRecord file.

  Returns:
    int64 array of record start offsets.

  Raises:
    RecordError: the file is truncated.
  """
  offsets = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    if size <= _READ_WHOLE_BYTES:  # One read beats a seek per record.
      data = f.read()
      header_at = lambda offset: data[offset:offset + _HEADER_BYTES]
    else:
      def header_at(offset):
        f.seek(offset)
        return f.read(_HEADER_BYTES)
    offset = 0
    while offset < size:
      header = header_at(offset)
      if len(header) < _HEADER_BYTES:
        raise RecordError(f"{path}: truncated record header at byte {offset} "
                          f"after {len(offsets)} records")
      (length,) = _LENGTH.unpack_from(header)
      end = offset + _HEADER_BYTES + length + _FOOTER_BYTES
      if end > size:
        raise RecordError(
            f"{path}: record {len(offsets)} at byte {offset} claims {length} "
            f"bytes but the file ends at byte {size} (truncated or corrupt)")
      offsets.append(offset)
      offset = end
  return np.array(offsets, dtype=np.int64)


def _read_plain(f, offset):
  """The data of the record at `offset` (CRCs were checked on opening)."""
  f.seek(offset)
  header = f.read(_HEADER_BYTES)
  (length,) = struct.unpack("<Q", header[:8])
  return f.read(length)


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

  def touch(self, stream: "ClassStream"):
    self._open[id(stream)] = weakref.ref(stream)
    self._open.move_to_end(id(stream))
    while len(self._open) > self._limit:
      _, oldest = self._open.popitem(last=False)
      oldest = oldest()
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
    # Optional (class_id, index) -> bool: records whose decoded image is
    # cached downstream are not read (`EpisodeReader.skip_cached_reads`).
    self.cached = None

  def ensure_open(self):
    """Indexes the file (once) and checks its record count."""
    if self._offsets is not None:
      return
    offsets = check_record_count(self.path, self.num_records, self.class_id)
    if _RandomRecordReader is not None:
      # One sequential pass with TF's reader checks every record's CRCs;
      # later reads use plain buffered I/O, several times faster than TF's
      # reader when called from a tf.data generator thread.
      verifier = _RandomRecordReader(self.path)
      try:
        for i, offset in enumerate(offsets):
          try:
            verifier.read(int(offset))
          except Exception as e:  # TF raises DataLossError and friends.
            raise RecordError(
                f"{self.path}: record {i} (byte {offset}) of class "
                f"{self.class_id} is corrupt: {e}") from None
      finally:
        verifier.close()
    self._offsets = offsets

  def close(self):
    """Closes the file; the next read reopens it."""
    if getattr(self, "_reader", None) is not None:
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
    if self._offsets is None:
      self.ensure_open()
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
    """The serialized record number `index` of the file."""
    self.ensure_open()
    if self._open_files is not None:
      self._open_files.touch(self)
    if self._reader is None:
      self._reader = open(self.path, "rb")  # pylint: disable=consider-using-with
    return _read_plain(self._reader, int(self._offsets[index]))

  def read_image(self, index: int) -> bytes:
    """The encoded image of record `index`, checked (see `decoder`).

    Empty when `self.cached` says the decoded image is cached (the record
    was read and checked when it was first used).
    """
    if self.cached is not None and self.cached(self.class_id, index):
      return b""
    where = f"{self.path}: record {index} of class {self.class_id}"
    try:
      image, label = decoder.parse_record(self.read(index))
    except ValueError as e:
      raise RecordError(f"{where}: {e}") from None
    if label != self.class_id:
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
               shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE):
    self.sources = list(sources)
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
    images = [streams[c].read_image(int(i)) if w else b""
              for c, i, w in zip(episode.class_ids.tolist(),
                                 episode.record_index.tolist(), wanted)]
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


class BatchReader:
  """Record order of upstream's batch pipeline, emulated on indices.

  Upstream reads each class file in order (no per-class shuffle), mixes the
  classes with `sample_from_datasets` weighted by class size (a class leaves
  the mix when exhausted; the epoch ends when all are), shuffles the mixed
  stream with one buffer, and repeats.
  """

  def __init__(self, spec, split, seed,
               shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE):
    classes = spec.get_classes(split)
    self._rng = np.random.default_rng(derive_seeds(seed, 5, count=2))
    self._streams = open_class_streams(spec, split,
                                       [self._rng] * len(classes), 0,
                                       OpenFiles())
    self._counts = np.array([s.num_records for s in self._streams])
    if not self._counts.sum():
      raise ValueError(f"split {spec_lib.as_split(split).name} of "
                       f"'{spec.name}' has no images")
    self._buffer = shuffle_buffer_size
    for s in self._streams:
      if s.num_records:
        s.ensure_open()

  def epoch(self):
    """(class index, record index) pairs of one epoch, in order."""
    remaining = self._counts.copy()
    weights = self._counts / self._counts.sum()
    chosen = []
    # Draw class choices in blocks with the current weights; a block stops
    # right after the draw that exhausts a class, whose weight then drops.
    while remaining.sum():
      p = np.where(remaining > 0, weights, 0.0)
      block = self._rng.choice(len(p), size=min(1024, remaining.sum()),
                               p=p / p.sum())
      onehot = np.zeros((len(block), len(p)), dtype=np.int64)
      onehot[np.arange(len(block)), block] = 1
      used = np.cumsum(onehot, axis=0)
      over = np.flatnonzero(((used >= remaining) & (remaining > 0)).any(
          axis=1))
      if len(over):
        block = block[:over[0] + 1]
      remaining -= np.bincount(block, minlength=len(p))
      chosen.append(block)
    classes = np.concatenate(chosen)
    # Records of a class come in file order.
    record = np.zeros(len(classes), dtype=np.int64)
    for c in np.unique(classes):
      where = classes == c
      record[where] = np.arange(where.sum())
    mixed = np.stack([classes, record], axis=1)
    return mixed[buffer_shuffle_order(len(mixed), self._buffer, self._rng)]

  def __iter__(self):
    """Yields (encoded image, absolute class id, record index), forever."""
    while True:
      for c, i in self.epoch():
        stream = self._streams[c]
        yield stream.read_image(int(i)), stream.class_id, int(i)
