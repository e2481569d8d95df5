"""Class record files: cheap start-up checks, indexing, verified reads.

TensorFlow-free for local paths (URLs import it through `files`), so the
`ctx-train` start-up checks can run it before TensorFlow and JAX load. The
episode readers (`reader.py`) build on it.

- `check_class_files` / `check_sources`: at start, per class file one stat
  and one read of its last record, whatever the number of records: the
  file exists, has room for the spec's count of records, and ends with a
  complete record (a file cut off at a random byte does not).
- `load_record_offsets`: a class file's record offsets from its sidecar
  index (`<class_id>.tfrecords.index`, written by md-convert and
  `md-index`: one stat and one small read, the same on local disks and
  buckets), checked against the file's size; without a valid index, from
  the 12-byte headers (`index_records`: a walk through the whole file).
  `check_record_count` compares the count with the spec's.
- `read_record`: one record by offset, both masked CRC-32Cs verified.
- `read_records`: the records an episode takes from one class, in few
  ranged reads (neighbours merged), every record's CRCs verified.
"""

import concurrent.futures
import functools
import logging
import os
import struct
import threading
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import files
from meta_dataset_pipeline import records_writer

# TFRecord framing: uint64 length, uint32 masked CRC of the length, data,
# uint32 masked CRC of the data.
_HEADER_BYTES = 12
_FOOTER_BYTES = 4
_LENGTH = struct.Struct("<Q")
# `index_records` reads files up to this size whole, larger ones by seeking
# to each record header, or, on a URL file system, in windows of this size
# (a bucket serves few large reads far faster than many small ones).
_READ_WHOLE_BYTES = 4 << 20
_URL_INDEX_WINDOW_BYTES = 16 << 20
# `read_records` merges two records into one read when at most this many
# bytes lie between them (see `default_max_gap`). Chosen with
# benchmarks/bucket_read_bench.py (emulated bucket, 30 ms a request, 100
# MB/s, 10 records of 100 KB from each 200-record class, block size 0):
# 1 MiB gave 1.2-1.3x the records/s of 0 (38% fewer requests) for 2.7x the
# bytes, 4 MiB 0.8-2.3x for 12x the bytes. Local files are read record by
# record (`_read_parts`), so there the gap only decides where a seek starts
# a range: 0 to 4 MiB measured the same, page cache warm.
LOCAL_MAX_GAP_BYTES = 64 << 10
# `MD_URL_MAX_GAP_BYTES` overrides it (benchmarks: 0 reads each record on
# its own, as on full-size ILSVRC class files, where an episode's picks of a
# class lie megabytes apart).
URL_MAX_GAP_BYTES = int(os.environ.get("MD_URL_MAX_GAP_BYTES", 1 << 20))
# The command that (re)writes sidecar indexes, named in warnings.
INDEX_COMMAND = "md-index"

_log = logging.getLogger(__name__)


class RecordError(ValueError):
  """A class record file that does not match its spec or is damaged."""


# The smallest record (empty data) takes 16 bytes, so a file that holds the
# spec's count of records has at least 16 bytes per record.
MIN_RECORD_BYTES = _HEADER_BYTES + _FOOTER_BYTES
# `check_class_files` reads this much of a file's end first to find its
# last record (most ILSVRC photos are under 256 KiB), growing the window 8x
# until it holds the record.
_TAIL_BYTES = 256 << 10
_MAX_TAIL_BYTES = 16 << 20
# Threads that stat class files: on an object store each stat is a request
# (tens of ms), on a local disk a few microseconds.
_CHECK_THREADS = 32


def check_class_files(spec, split) -> list[str]:
  """Paths of the class files of `split`, cheaply checked against the spec.

  Cost independent of the number of records: per file one stat and one
  read of its last record (in parallel threads, as on an object store each
  is a request). Every file must exist, have room for the spec's count of
  records, and end with a complete record (a file cut off at a random byte
  does not). A file with a valid sidecar index (one made for a file of its
  size) has its index read instead of its tail, and its exact record count
  checked now. Otherwise the exact record count is checked later, when a
  class is first used (`ClassStream`); the CRCs when records are read.

  Args:
    spec: a dataset spec.
    split: the split to check.

  Returns:
    The file path of every class of the split, in class order.

  Raises:
    FileNotFoundError: the records folder or a class file is missing.
    NotImplementedError: sharded files (`{}_{}.tfrecords`), as upstream.
    RecordError: a file is too small for the spec's count, or truncated.
  """
  own_check = getattr(spec, "check_split", None)
  if own_check is not None:  # Not class files (TFDS data: `tfds_source`).
    return own_check(split)
  if spec.file_pattern not in spec_lib.SUPPORTED_FILE_PATTERNS:
    raise NotImplementedError(
        f"{spec.name}: file_pattern {spec.file_pattern!r} (sharded class "
        "files) is not supported; one file per class is expected")
  if not files.isdir(spec.path):
    raise FileNotFoundError(
        f"records folder of '{spec.name}' not found: {spec.path}")
  classes = spec.get_classes(split)
  paths = [spec.class_file(c) for c in classes]

  def check(path_and_class):
    path, class_id = path_and_class
    try:
      _check_file(path, spec.get_total_images_per_class(class_id), class_id)
    except (FileNotFoundError, RecordError) as e:
      return e
    return None

  with concurrent.futures.ThreadPoolExecutor(
      max(1, min(_CHECK_THREADS, len(paths)))) as pool:
    problems = list(pool.map(check, zip(paths, classes)))
  missing = [p for p, e in zip(paths, problems)
             if isinstance(e, FileNotFoundError)]
  if missing:
    split_name = spec_lib.as_split(split).name
    raise FileNotFoundError(
        f"{len(missing)} class record files of '{spec.name}' ({split_name}) "
        f"are missing, e.g. {', '.join(missing[:3])}")
  bad = [e for e in problems if e is not None]
  if bad:
    raise bad[0]
  return paths


# (path, size, mtime, count) of files that passed `_check_file`: the
# pipeline's builders check the same files again.
_CHECKED = set()


def _check_file(path: str, num_records: int, class_id: int):
  """Size and last-record check of one class file (see check_class_files)."""
  st = files.stat(path)
  key = (path, st.size, st.mtime_ns, num_records)
  if key in _CHECKED:
    return
  # A sidecar index made for a file of this size says where every record
  # ends, the last one at the end of the file: one small read instead of the
  # tail read, and the exact record count now rather than on first use.
  offsets = _sidecar_offsets(path, st.size)
  if offsets is None:
    _check_file_uncached(path, st.size, num_records, class_id)
  else:
    offsets.flags.writeable = False
    _INDEX_CACHE[_cache_key(path, st)] = offsets
    _check_count(path, offsets, num_records, class_id)
  _CHECKED.add(key)


def _check_file_uncached(path: str, size: int, num_records: int,
                         class_id: int):
  if size < num_records * MIN_RECORD_BYTES:
    raise RecordError(
        f"{path}: {size} bytes cannot hold the {num_records} records the "
        f"spec lists for class {class_id} (truncated?)")
  if not size:
    return
  window = min(size, _TAIL_BYTES)
  with files.open_binary(path) as f:
    while True:
      f.seek(size - window)
      if _last_record_start(f.read(window)) is not None:
        return
      if window == size or window >= _MAX_TAIL_BYTES:
        break
      window = min(size, window * 8)
  if window < size:  # A record larger than the window, or damage: exact.
    index_records(path)
  raise RecordError(
      f"{path}: the file of class {class_id} does not end with a complete "
      "record (truncated or corrupt)")


def _last_record_start(tail: bytes) -> "int | None":
  """Offset in `tail` of a record that ends exactly at its end, if any.

  A record at offset `o` of an `n`-byte tail ends there when its length
  field equals `n - o - 16`; its masked length CRC confirms the header.
  Candidates are first narrowed, in numpy, to offsets whose length field
  has its 4 high bytes zero (records are under 4 GiB).
  """
  n = len(tail)
  if n < MIN_RECORD_BYTES:
    return None
  b = np.frombuffer(tail, np.uint8)
  m = n - MIN_RECORD_BYTES + 1  # Candidate offsets 0..m-1.
  high_zero = ((b[4:4 + m] == 0) & (b[5:5 + m] == 0) & (b[6:6 + m] == 0)
               & (b[7:7 + m] == 0))
  for o in np.flatnonzero(high_zero)[::-1].tolist():
    if (_LENGTH.unpack_from(tail, o)[0] == n - o - MIN_RECORD_BYTES and
        records_writer.masked_crc(tail[o:o + 8]) == tail[o + 8:o + 12]):
      return o
  return None


def check_record_count(path: str, num_records: int,
                       class_id: int) -> np.ndarray:
  """Record offsets of a class file whose count must be `num_records`.

  Args:
    path: the class's TFRecord file.
    num_records: the number of images the spec lists for the class.
    class_id: the class, for the error message.

  Returns:
    The record start offsets (`load_record_offsets` without the end).

  Raises:
    RecordError: the file is truncated or the counts differ.
  """
  return load_record_offsets(path, num_records, class_id)[:-1]


def index_file_path(path: str) -> str:
  """The sidecar index of class file `path`: `<path>.index`.

  A suffix after the whole name: the index sits beside its file, follows
  any class-file name, and matches no `{}.tfrecords` pattern or
  `*.tfrecords` glob, so nothing that lists class files takes it for one.
  """
  return os.fspath(path) + records_writer.INDEX_SUFFIX


def write_record_index(path: str, offsets: "np.ndarray | None" = None) -> str:
  """Writes the sidecar index of class file `path`.

  Locally through a temporary name and a rename; on an object store a
  plain write (objects are replaced at once).

  Args:
    path: the class file (local or a URL).
    offsets: its record start offsets (`index_records`), or the starts plus
      the file's end (`load_record_offsets`); None: index the file first.

  Returns:
    The sidecar's path.

  Raises:
    RecordError: `offsets` is None and the file is truncated.
  """
  size = files.stat(path).size
  if offsets is None:
    offsets = index_records(path)
  offsets = np.asarray(offsets, dtype=np.int64)
  if len(offsets) and offsets[-1] == size:
    offsets = offsets[:-1]
  index_path = index_file_path(path)
  files.write_bytes(index_path,
                    records_writer.encode_record_index(size, offsets))
  return index_path


def decode_record_index(data: bytes, file_size: int) -> np.ndarray:
  """Record offsets (starts and end) from sidecar bytes, checked.

  Args:
    data: the sidecar's content.
    file_size: the class file's current size.

  Returns:
    int64 array: every record's start, then `file_size`.

  Raises:
    ValueError: not an index (says why), or one of a file of another size
      (the message starts with "stale").
  """
  header = records_writer.INDEX_HEADER
  if len(data) < header.size + 4:
    raise ValueError(f"{len(data)} bytes, too short for an index")
  magic, version, _, size, count = header.unpack_from(data)
  if magic != records_writer.INDEX_MAGIC:
    raise ValueError("not a record index (bad magic)")
  if version != records_writer.INDEX_VERSION:
    raise ValueError(f"index version {version}, expected "
                     f"{records_writer.INDEX_VERSION}")
  if len(data) != header.size + 8 * count + 4:
    raise ValueError(f"{len(data)} bytes for {count} records (cut short?)")
  if records_writer.masked_crc(data[:-4]) != data[-4:]:
    raise ValueError("index CRC mismatch")
  if size != file_size:
    raise ValueError(f"stale: made for a file of {size} bytes, the file has "
                     f"{file_size}")
  offsets = np.empty(count + 1, dtype=np.int64)
  offsets[:count] = np.frombuffer(data, "<i8", count, header.size)
  offsets[count] = size
  if count and (offsets[0] != 0 or np.any(
      np.diff(offsets) < MIN_RECORD_BYTES)):
    raise ValueError("offsets out of order")
  if not count and size:
    raise ValueError(f"no records in a file of {size} bytes")
  return offsets


# Sidecars already warned about (stale or unreadable), by path.
_WARNED = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(index_path: str, path: str, why: str):
  with _WARNED_LOCK:
    if index_path in _WARNED:
      return
    _WARNED.add(index_path)
  _log.warning(
      "%s: record index not used (%s); reading the record headers of %s "
      "instead. Rewrite the index with: %s %s", index_path, why, path,
      INDEX_COMMAND, files.dirname(path) or ".")


def _sidecar_offsets(path: str, size: int,
                     warn: bool = True) -> "np.ndarray | None":
  """Offsets from `path`'s sidecar if it is valid for `size`, else None."""
  index_path = index_file_path(path)
  try:
    data = files.read_bytes(index_path)
  except FileNotFoundError:
    return None
  try:
    return decode_record_index(data, size)
  except ValueError as e:
    if warn:
      _warn_once(index_path, path, str(e))
    return None


def valid_record_index(path: str) -> "np.ndarray | None":
  """The offsets in `path`'s sidecar (starts, then the end), if valid.

  Valid: present, well formed and made for a file of `path`'s current
  size. Not cached, no warning (for `md-index` and md-convert's resume).

  Raises:
    FileNotFoundError: no class file `path`.
  """
  return _sidecar_offsets(path, files.stat(path).size, warn=False)


def load_record_offsets(path: str, num_records: int,
                        class_id: int) -> np.ndarray:
  """Record offsets of a class file: its sidecar's, or by walking it.

  With a sidecar index (`index_file_path`) made for a file of this size:
  one stat and one small read, also on a bucket. A sidecar of another size
  (the file was rewritten) or an unreadable one is logged once, naming the
  command that rewrites it, and ignored; without a usable sidecar the file
  is walked (`index_records`). Remembered per process per (path, size,
  modification time).

  Args:
    path: the class's TFRecord file (local or a URL).
    num_records: the number of images the spec lists for the class.
    class_id: the class, for the error message.

  Returns:
    int64 array of `num_records + 1` offsets: each record's start, then the
    end of the last record (the file's size).

  Raises:
    FileNotFoundError: no such file.
    RecordError: the file is truncated or holds another count of records.
  """
  st = files.stat(path)
  key = _cache_key(path, st)
  offsets = _INDEX_CACHE.get(key)
  if offsets is None:
    offsets = _sidecar_offsets(path, st.size)
    if offsets is None:
      offsets = np.append(index_records(path), np.int64(st.size))
    offsets.flags.writeable = False
    _INDEX_CACHE[key] = offsets
  _check_count(path, offsets, num_records, class_id)
  return offsets


def _cache_key(path: str, st: files.Stat) -> tuple:
  return (path if files.is_url(path) else os.path.abspath(path), st.size,
          st.mtime_ns)


def _check_count(path: str, offsets: np.ndarray, num_records: int,
                 class_id: int):
  if len(offsets) - 1 != num_records:
    raise RecordError(
        f"{path}: the spec lists {num_records} images for class "
        f"{class_id} but the file holds {len(offsets) - 1} records")


def default_max_gap(path: str) -> int:
  """`read_records`' merge gap for `path` (see `URL_MAX_GAP_BYTES`).

  On a bucket a request costs tens of ms, as long as reading a few MB more
  in the same request; 1 MiB saves most of the requests of dense picks at
  a few times the bytes of the records. Local files are read record by
  record where they lie, the gap only groups their seeks.
  """
  return URL_MAX_GAP_BYTES if files.is_url(path) else LOCAL_MAX_GAP_BYTES


def read_records(path: str, indices, offsets: np.ndarray, class_id: int,
                 max_gap: "int | None" = None, f=None) -> list:
  """The data of records `indices` of a class file, CRCs verified.

  Reads few ranges: the distinct records, sorted, are grouped so that at
  most `max_gap` bytes lie between neighbours of a group, and each group
  is read with one seek and one read. Every record's length field must
  match its offsets and both masked CRC-32Cs must match.

  Args:
    path: the class file (local or a URL), for opening and messages.
    indices: record numbers, in the order wanted; repeats allowed.
    offsets: from `load_record_offsets` (starts, then the end).
    class_id: the class, for messages.
    max_gap: bytes between two records below which they are read together;
      None: `default_max_gap(path)`.
    f: an open binary file of `path` to read from (left open), best from
      `files.open_ranges` (on a bucket one request per range, where a GFile
      reads 512 KiB buffers); None: open and close one.

  Returns:
    The records' data (bytes), in the order of `indices`.

  Raises:
    IndexError: an index outside the file.
    RecordError: a corrupt or cut-short record, naming file, record, byte
      offset and class.
  """
  indices = np.asarray(indices, dtype=np.int64).ravel().tolist()
  if not indices:
    return []
  num = len(offsets) - 1
  if min(indices) < 0 or max(indices) >= num:
    bad = next(i for i in indices if not 0 <= i < num)
    raise IndexError(f"{path}: record {bad} requested from class "
                     f"{class_id}, which has {num} records")
  if max_gap is None:
    max_gap = default_max_gap(path)
  # Plain Python on these few numbers: numpy's per-call cost is larger.
  wanted = sorted(set(indices))
  where = np.array(wanted)
  offsets = np.asarray(offsets)
  starts, ends = offsets[where].tolist(), offsets[where + 1].tolist()
  bounds = [0] + [k for k in range(1, len(wanted))
                  if starts[k] - ends[k - 1] > max_gap] + [len(wanted)]
  data = {}
  one_read = files.is_url(path)
  own = f is None
  if own:
    f = files.open_ranges(path)
  try:
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      first = starts[lo]
      f.seek(first)
      if one_read:  # One request per range, then slices.
        buf = f.read(ends[hi - 1] - first)
        parts = (lambda s, e: (buf[s - first:s - first + _HEADER_BYTES],
                               buf[s - first + _HEADER_BYTES:e - first -
                                   _FOOTER_BYTES],
                               buf[e - first - _FOOTER_BYTES:e - first]))
      else:  # Sequential reads: no copy out of a range buffer (below).
        parts = functools.partial(_read_parts, f)
      for k in range(lo, hi):
        data[wanted[k]] = _check_record(
            *parts(starts[k], ends[k]), ends[k] - starts[k], path,
            wanted[k], starts[k], class_id)
  finally:
    if own:
      f.close()
  return [data[i] for i in indices]


def _read_parts(f, start: int, end: int) -> tuple[bytes, bytes, bytes]:
  """Header, data and footer of the record at [start, end) of local `f`.

  Local files read each record's parts where they lie (within a range the
  file is already there, or a seek past the gap): the CRC library takes
  only `bytes`, so slicing the data out of one range buffer would copy every
  record once more (measured 1.7x slower per 100 KB record, page cache warm).
  """
  if f.tell() != start:
    f.seek(start)
  header = f.read(_HEADER_BYTES)
  data = f.read(max(0, end - start - MIN_RECORD_BYTES))
  return header, data, f.read(_FOOTER_BYTES)


def _check_record(header: bytes, data: bytes, footer: bytes, size: int,
                  path: str, index: int, offset: int, class_id: int) -> bytes:
  """`data` if the record's parts are whole and match (`read_records`).

  Args:
    header, data, footer: the record's parts as read (short at the end of
      the file).
    size: the record's size by the index.
    path, index, offset, class_id: for the message.

  Raises:
    RecordError: naming file, record, byte offset and class.
  """
  if len(header) + len(data) + len(footer) < size:
    why = "record cut short by the end of the file"
  elif records_writer.masked_crc(header[:8]) != header[8:]:
    why = "length CRC mismatch"
  elif _LENGTH.unpack_from(header)[0] != size - MIN_RECORD_BYTES:
    why = (f"its length field says {_LENGTH.unpack_from(header)[0]} bytes "
           f"but the index says {size - MIN_RECORD_BYTES}")
  elif records_writer.masked_crc(data) != footer:
    why = "data CRC mismatch"
  else:
    return data
  raise RecordError(f"{path}: record {index} (byte {offset}) of class "
                    f"{class_id} is corrupt: {why}")


# Record offsets (starts, then the end) by (path, size, modification time):
# `load_record_offsets`, `index_records_cached`.
_INDEX_CACHE = {}


def index_records_cached(path: str) -> np.ndarray:
  """`index_records`, remembered per (path, size, modification time)."""
  st = files.stat(path)
  key = _cache_key(path, st)
  offsets = _INDEX_CACHE.get(key)
  if offsets is None:
    offsets = np.append(index_records(path), np.int64(st.size))
    offsets.flags.writeable = False
    _INDEX_CACHE[key] = offsets
  return offsets[:-1]


def index_records(path: str) -> np.ndarray:
  """Byte offsets of the records of a TFRecord file (headers only).

  Args:
    path: an uncompressed TFRecord file (local or a `tf.io.gfile` URL).

  Returns:
    int64 array of record start offsets.

  Raises:
    RecordError: the file is truncated.
  """
  offsets = []
  size = files.stat(path).size
  if size <= _READ_WHOLE_BYTES:  # One read beats a seek per record.
    window = size
  elif files.is_url(path):  # Few large reads: each read is a request.
    window = _URL_INDEX_WINDOW_BYTES
  else:  # Local: a seek and a 12-byte read per record, cheap.
    window = _HEADER_BYTES
  # On a URL file system each window is one ranged read (a GFile reads
  # through a 512 KiB buffer: 32 requests per 16 MiB window).
  opener = files.open_ranges if window > _HEADER_BYTES else files.open_binary
  with opener(path) as f:
    buf, buf_start = b"", 0

    def header_at(offset):
      nonlocal buf, buf_start
      if not (buf_start <= offset and
              offset + _HEADER_BYTES <= buf_start + len(buf)):
        f.seek(offset)
        buf, buf_start = f.read(window), offset
      return buf[offset - buf_start:offset - buf_start + _HEADER_BYTES]

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


def read_record(f, offset: int) -> bytes:
  """The data of the record at `offset` of file `f`, CRCs verified.

  Raises:
    ValueError: the record is cut short or a CRC does not match (the
      caller names file and record).
  """
  f.seek(offset)
  header = f.read(_HEADER_BYTES)
  if len(header) < _HEADER_BYTES:
    raise ValueError("truncated record header")
  if records_writer.masked_crc(header[:8]) != header[8:]:
    raise ValueError("length CRC mismatch")
  (length,) = _LENGTH.unpack_from(header)
  data = f.read(length)
  footer = f.read(_FOOTER_BYTES)
  if len(footer) < _FOOTER_BYTES:
    raise ValueError("record cut short by the end of the file")
  if records_writer.masked_crc(data) != footer:
    raise ValueError("data CRC mismatch")
  return data


def check_sources(specs, splits=("TRAIN", "VALID", "TEST")):
  """`check_class_files` for every split of every source a run will use.

  Meant for the start of a run, before anything is written: a missing or
  truncated class file of any split (say a test class, otherwise first
  read after training) fails at once, naming the file. Costs one stat and
  one small tail read per class file, whatever the number of records.

  Args:
    specs: dataset specs (one or a sequence).
    splits: split names or `Split`s to check.

  Raises:
    FileNotFoundError: a records folder or class file is missing.
    RecordError: a class file is too small for its spec or truncated.
  """
  if not isinstance(specs, Sequence):
    specs = [specs]
  for spec in specs:
    for split in splits:
      check_class_files(spec, split)
