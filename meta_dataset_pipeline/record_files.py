"""Class record files: cheap start-up checks, indexing, verified reads.

TensorFlow-free for local paths (URLs import it through `files`), so the
`ctx-train` start-up checks can run it before TensorFlow and JAX load. The
episode readers (`reader.py`) build on it.

- `check_class_files` / `check_sources`: at start, per class file one stat
  and one read of its last record, whatever the number of records: the
  file exists, has room for the spec's count of records, and ends with a
  complete record (a file cut off at a random byte does not).
- `index_records`: record offsets from the 12-byte headers, built when a
  class is first used (`check_record_count` compares the count with the
  spec's).
- `read_record`: one record by offset, both masked CRC-32Cs verified.
"""

import concurrent.futures
import os
import struct
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
  does not). The exact record count and the CRCs are checked later, when a
  class is first used (`ClassStream`).

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
  if key not in _CHECKED:
    _check_file_uncached(path, st.size, num_records, class_id)
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
  st = files.stat(path)
  key = (path if files.is_url(path) else os.path.abspath(path), st.size,
         st.mtime_ns)
  offsets = _INDEX_CACHE.get(key)
  if offsets is None:
    offsets = index_records(path)
    _INDEX_CACHE[key] = offsets
  return offsets


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
  with files.open_binary(path) as f:
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
