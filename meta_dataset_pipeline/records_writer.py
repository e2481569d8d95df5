"""Writers for the official Meta-Dataset record format.

The official converters (`meta_dataset.dataset_conversion`) store a dataset
as one folder holding

- one uncompressed TFRecord file per class, `<class_id>.tfrecords`, whose
  records are serialized `tf.train.Example`s with exactly two features:
  `image` (a `bytes_list` holding one encoded image) and `label` (an
  `int64_list` holding the absolute class id, equal to the file's number);
- `dataset_spec.json`, the `to_dict()` of the dataset's specification, dumped
  with `json.dump(..., indent=2)` (no trailing newline). Class ids are
  contiguous: train classes first, then valid, then test.

Not official: next to a class file `write_class_records(...,
write_index=True)` (md-convert) can write its record-offset index,
`<class_id>.tfrecords.index` (`encode_record_index`; read by
`record_files.load_record_offsets`), so that readers need not walk the
file's headers.

These helpers write exactly that, for a flat `DatasetSpecification` or a
`BiLevelDatasetSpecification` (superclasses, as Omniglot). Every file is
written to a temporary name in the same folder and renamed into place when
complete, so an interrupted run never leaves a truncated file under a final
name.

They are pure Python: the two protobuf messages and the TFRecord framing
(length, masked CRC-32C) are encoded by hand, byte-identical to
`tf.train.Example.SerializeToString(deterministic=True)` and
`tf.io.TFRecordWriter` (tests check both). This module thus needs no
TensorFlow, whose import takes seconds (and, in TF 2.21, also imports JAX
when it is installed: tensorflow/lite/python/util.py tries `from jax import
jit`).
"""

import contextlib
import json
import os
import struct
import uuid
from typing import Iterable, Iterator, Mapping, Sequence

FILE_PATTERN = "{}.tfrecords"
DATASET_SPEC_FILENAME = "dataset_spec.json"
# Order of `classes_per_split`, as the official `Split` enum lists it.
SPLITS = ("TRAIN", "VALID", "TEST")
# Prefix of temporary files; readers never match it (it is not `<int>.*`).
TMP_PREFIX = ".tmp-"
# Record-offset index of a class file: `<class_id>.tfrecords.index`. A suffix
# after the whole name, so it sits beside its file, is derived from any
# class-file name, and matches no `{}.tfrecords` pattern or `*.tfrecords`
# glob (the spec, md-convert --verify and TF readers never take it for
# records).
INDEX_SUFFIX = ".index"
# Index layout, little-endian: magic, version, reserved (0), the class
# file's size, the record count; then one int64 start offset per record;
# then the masked CRC-32C of all the bytes before it.
INDEX_MAGIC = b"TFRECIDX"
INDEX_VERSION = 1
INDEX_HEADER = struct.Struct("<8sIIQQ")


@contextlib.contextmanager
def atomic_output_path(path: str) -> Iterator[str]:
  """Yields a temporary path that is renamed to `path` on success.

  The temporary file sits in the same folder (so the rename is atomic on
  POSIX file systems) and is removed if the body raises, so `path` either
  keeps its old content or gets the complete new one.

  Args:
    path: the final file path.

  Yields:
    The temporary path to write to.
  """
  folder = os.path.dirname(os.path.abspath(path))
  # A fresh name rather than `tempfile.mkstemp`, whose 0600 mode would
  # survive the rename; the writer creates the file with the usual umask.
  tmp_path = os.path.join(folder, "%s%s.%d.%s" % (
      TMP_PREFIX, os.path.basename(path), os.getpid(), uuid.uuid4().hex))
  try:
    yield tmp_path
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_path)
    raise


def _crc32c_tables() -> tuple[tuple[int, ...], ...]:
  """Lookup tables for slicing-by-8 CRC-32C (Castagnoli, reflected)."""
  t0 = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    t0.append(c)
  tables = [t0]
  for _ in range(7):
    prev = tables[-1]
    tables.append([(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)])
  return tuple(tuple(t) for t in tables)


_CRC_TABLES = _crc32c_tables()

try:
  import google_crc32c as _google_crc32c  # pylint: disable=g-import-not-at-top
except ImportError:
  _google_crc32c = None


def _crc32c_python(data: bytes) -> int:
  """CRC-32C of `data` in pure Python (slicing-by-8, about 5 MB/s).

  Args:
    data: the bytes to checksum.

  Returns:
    The unsigned 32-bit CRC.
  """
  t0, t1, t2, t3, t4, t5, t6, t7 = _CRC_TABLES
  crc = 0xFFFFFFFF
  n8 = len(data) // 8 * 8
  for (w,) in struct.iter_unpack("<Q", memoryview(data)[:n8]):
    w ^= crc
    crc = (t7[w & 0xFF] ^ t6[(w >> 8) & 0xFF] ^ t5[(w >> 16) & 0xFF] ^
           t4[(w >> 24) & 0xFF] ^ t3[(w >> 32) & 0xFF] ^
           t2[(w >> 40) & 0xFF] ^ t1[(w >> 48) & 0xFF] ^ t0[w >> 56])
  for b in data[n8:]:
    crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
  """CRC-32C of `data`, as TFRecord framing uses it.

  Uses the C library of `google-crc32c` (GB/s) when installed; the pure
  Python fallback (about 5 MB/s) would take hours on ILSVRC's 140 GB.

  Args:
    data: the bytes to checksum.

  Returns:
    The unsigned 32-bit CRC.
  """
  if _google_crc32c is not None:
    return _google_crc32c.value(bytes(data))
  return _crc32c_python(data)


def masked_crc(data: bytes) -> bytes:
  """The 4 CRC bytes TFRecord framing stores for `data`."""
  # TFRecord stores a rotated, offset CRC (so that CRCs of CRCs are not
  # trivially zero), little-endian.
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8)
                     & 0xFFFFFFFF)


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's CRC."""
  length = struct.pack("<Q", len(data))
  return length + masked_crc(length) + data + masked_crc(data)


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _len_field(field_number: int, payload: bytes) -> bytes:
  # A length-delimited protobuf field (wire type 2).
  return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def serialize_example(image_bytes: bytes, label: int) -> bytes:
  """Serializes one record as the official converters do.

  Hand-encoded `tf.train.Example`:
  Example.features(1) > Features.feature(1, map entries key=1 value=2) >
  Feature.bytes_list(1) / Feature.int64_list(3) > value(1) (int64 packed).

  Args:
    image_bytes: the encoded image (JPEG or PNG bytes).
    label: the absolute class id (>= 0).

  Returns:
    The same bytes as `tf.train.Example(...).SerializeToString(
    deterministic=True)` for features `image` and `label` only.
  """
  if label < 0:
    raise ValueError(f"class ids are >= 0, got {label}")
  image = _len_field(1, _len_field(1, image_bytes))
  label_feature = _len_field(3, _len_field(1, _varint(int(label))))
  # `feature` is a protobuf map, whose wire order is unspecified (the
  # official fixtures hold both orders); sorted keys, as TF's deterministic
  # serialization, give the same bytes for the same inputs. Any order parses
  # identically.
  features = (
      _len_field(1, _len_field(1, b"image") + _len_field(2, image)) +
      _len_field(1, _len_field(1, b"label") + _len_field(2, label_feature)))
  return _len_field(1, features)


def class_records_path(records_dir: str, class_id: int) -> str:
  """Returns the path of the record file of class `class_id`."""
  return os.path.join(records_dir, FILE_PATTERN.format(int(class_id)))


def encode_record_index(file_size: int, offsets: Sequence[int]) -> bytes:
  """The bytes of a record-offset index (see `INDEX_HEADER`).

  Args:
    file_size: the class file's size in bytes.
    offsets: the start offset of every record, in order.

  Returns:
    Header, offsets (int64 little-endian) and the masked CRC.
  """
  body = (INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, int(file_size),
                            len(offsets)) +
          struct.pack(f"<{len(offsets)}q", *map(int, offsets)))
  return body + masked_crc(body)


def write_record_index_file(path: str, file_size: int,
                            offsets: Sequence[int]) -> str:
  """Writes the index of local class file `path`, atomically.

  Returns:
    The index's path (`path + INDEX_SUFFIX`).
  """
  index_path = path + INDEX_SUFFIX
  with atomic_output_path(index_path) as tmp:
    with open(tmp, "wb") as f:
      f.write(encode_record_index(file_size, offsets))
  return index_path


def write_class_records(records_dir: str, class_id: int,
                        images: Iterable[bytes],
                        write_index: bool = False) -> int:
  """Writes the record file of one class, atomically.

  Args:
    records_dir: the dataset folder; must exist.
    class_id: the absolute class id; also the file's name.
    images: the encoded images of the class, in record order.
    write_index: also write the file's record-offset index
      (`<class_id>.tfrecords.index`), after the class file is in place.

  Returns:
    The number of records written.
  """
  offsets, size = [], 0
  path = class_records_path(records_dir, class_id)
  # An index of the file being replaced would describe the old records.
  with contextlib.suppress(FileNotFoundError):
    os.remove(path + INDEX_SUFFIX)
  with atomic_output_path(path) as tmp:
    # No compression: the official reader opens the files uncompressed.
    with open(tmp, "wb") as f:
      for image_bytes in images:
        frame = tfrecord_frame(serialize_example(image_bytes, class_id))
        f.write(frame)
        offsets.append(size)
        size += len(frame)
  if write_index:
    write_record_index_file(path, size, offsets)
  return len(offsets)


def dataset_spec_dict(name: str,
                      classes_per_split: Mapping[str, int],
                      images_per_class: Sequence[int],
                      class_names: Sequence[str],
                      path: str) -> dict:
  """Builds a flat `DatasetSpecification` dict as `to_dict()` returns it.

  Args:
    name: the dataset name.
    classes_per_split: number of classes for each of "TRAIN", "VALID" and
      "TEST"; class ids run train, then valid, then test.
    images_per_class: number of images of class id `i`, for every id.
    class_names: name of class id `i`, for every id.
    path: the records folder, stored as given (the official loader replaces
      it with the folder it loads from).

  Returns:
    A dict with the official keys in the official order; integer keys are
    strings, as after a JSON round trip.

  Raises:
    ValueError: if the counts are inconsistent.
  """
  if set(classes_per_split) != set(SPLITS):
    raise ValueError(f"classes_per_split needs keys {SPLITS}, got "
                     f"{sorted(classes_per_split)}")
  num_classes = sum(int(classes_per_split[s]) for s in SPLITS)
  if len(images_per_class) != num_classes or len(class_names) != num_classes:
    raise ValueError(
        f"{num_classes} classes in classes_per_split, but "
        f"{len(images_per_class)} image counts and {len(class_names)} names")
  return {
      "name": name,
      "classes_per_split": {s: int(classes_per_split[s]) for s in SPLITS},
      "images_per_class": {
          str(i): int(n) for i, n in enumerate(images_per_class)},
      "class_names": {str(i): str(n) for i, n in enumerate(class_names)},
      "path": path,
      "file_pattern": FILE_PATTERN,
      "__class__": "DatasetSpecification",
  }


def bilevel_dataset_spec_dict(name: str,
                              superclasses_per_split: Mapping[str, int],
                              classes_per_superclass: Sequence[int],
                              images_per_class: Sequence[int],
                              superclass_names: Sequence[str],
                              class_names: Sequence[str],
                              path: str) -> dict:
  """Builds a `BiLevelDatasetSpecification` dict as `to_dict()` returns it.

  Args:
    name: the dataset name.
    superclasses_per_split: number of superclasses for each of "TRAIN",
      "VALID" and "TEST"; superclass ids run train, then valid, then test.
    classes_per_superclass: number of classes of superclass `i`; class ids
      run through superclass 0's classes, then superclass 1's, and so on.
    images_per_class: number of images of class id `i`, for every id.
    superclass_names: name of superclass `i`.
    class_names: name of class id `i`, for every id.
    path: the records folder, stored as given.

  Returns:
    A dict with the official keys in the official order (integer keys as
    strings).

  Raises:
    ValueError: if the counts are inconsistent.
  """
  if set(superclasses_per_split) != set(SPLITS):
    raise ValueError(f"superclasses_per_split needs keys {SPLITS}, got "
                     f"{sorted(superclasses_per_split)}")
  num_superclasses = sum(int(superclasses_per_split[s]) for s in SPLITS)
  num_classes = sum(int(n) for n in classes_per_superclass)
  if (len(classes_per_superclass) != num_superclasses or
      len(superclass_names) != num_superclasses):
    raise ValueError(
        f"{num_superclasses} superclasses in superclasses_per_split, but "
        f"{len(classes_per_superclass)} class counts and "
        f"{len(superclass_names)} names")
  if len(images_per_class) != num_classes or len(class_names) != num_classes:
    raise ValueError(
        f"{num_classes} classes in classes_per_superclass, but "
        f"{len(images_per_class)} image counts and {len(class_names)} names")
  return {
      "name": name,
      "superclasses_per_split": {
          s: int(superclasses_per_split[s]) for s in SPLITS},
      "classes_per_superclass": {
          str(i): int(n) for i, n in enumerate(classes_per_superclass)},
      "images_per_class": {
          str(i): int(n) for i, n in enumerate(images_per_class)},
      "superclass_names": {
          str(i): str(n) for i, n in enumerate(superclass_names)},
      "class_names": {str(i): str(n) for i, n in enumerate(class_names)},
      "path": path,
      "file_pattern": FILE_PATTERN,
      "__class__": "BiLevelDatasetSpecification",
  }


def write_dataset_spec(records_dir: str, spec: Mapping) -> str:
  """Writes `dataset_spec.json` into `records_dir`, atomically.

  Args:
    records_dir: the dataset folder; must exist.
    spec: the dict from `dataset_spec_dict`.

  Returns:
    The path written.
  """
  path = os.path.join(records_dir, DATASET_SPEC_FILENAME)
  with atomic_output_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      # Same call as the official converter: 2-space indent, ASCII escapes,
      # no trailing newline.
      json.dump(spec, f, indent=2)
  return path
