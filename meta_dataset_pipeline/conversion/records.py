"""Reading back TFRecord files of `tf.train.Example`s, in pure Python.

The inverse of `records_writer`'s framing and two-feature Example, with
every check `md-convert --verify` reports: framing, both masked CRCs, the
protobuf structure, and the `image`/`label` features.
"""

import struct
from typing import Iterator

from meta_dataset_pipeline import records_writer

_HEADER = 12  # uint64 length + masked CRC of the length
_FOOTER = 4  # masked CRC of the data


class RecordProblem(ValueError):
  """A record file or record that is not what the official format says."""


def iter_records(path: str, on_bad_data=None) -> Iterator[bytes]:
  """Yields the data of every record of an uncompressed TFRecord file.

  Args:
    path: the file.
    on_bad_data: None to raise on a data CRC mismatch; else called with the
      problem, and the record is skipped (its length field is intact, so the
      next records can still be read).

  Yields:
    The record payloads, in order.

  Raises:
    RecordProblem: truncated file or a CRC mismatch (names the record).
  """
  with open(path, "rb") as f:
    data = f.read()
  offset, index = 0, 0
  while offset < len(data):
    header = data[offset:offset + _HEADER]
    if len(header) < _HEADER:
      raise RecordProblem(f"record {index}: truncated header at byte {offset}")
    (length,) = struct.unpack_from("<Q", header)
    end = offset + _HEADER + length + _FOOTER
    if end > len(data):
      raise RecordProblem(
          f"record {index}: claims {length} bytes but the file ends at byte "
          f"{len(data)} (truncated)")
    payload = data[offset + _HEADER:end - _FOOTER]
    framed = records_writer.tfrecord_frame(payload)
    if framed[8:12] != header[8:12]:
      raise RecordProblem(f"record {index}: bad length CRC")
    if framed[-4:] != data[end - _FOOTER:end]:
      problem = RecordProblem(f"record {index}: bad data CRC")
      if on_bad_data is None:
        raise problem
      on_bad_data(problem)
    else:
      yield payload
    offset, index = end, index + 1


def count_records(path: str) -> int:
  """Number of records of a file, from the length fields only.

  Raises:
    RecordProblem: the file is truncated.
  """
  count, offset = 0, 0
  with open(path, "rb") as f:
    size = f.seek(0, 2)
    while offset < size:
      f.seek(offset)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        raise RecordProblem(f"truncated header at byte {offset}")
      offset += _HEADER + struct.unpack_from("<Q", header)[0] + _FOOTER
      if offset > size:
        raise RecordProblem(f"record {count} runs past the end of the file")
      count += 1
  return count


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= len(buf):
      raise RecordProblem("truncated varint")
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if not b & 0x80:
      return value, pos
    shift += 7
    if shift > 63:
      raise RecordProblem("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  """(field number, wire type, value) of a protobuf message."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      size, pos = _varint(buf, pos)
      if pos + size > len(buf):
        raise RecordProblem("truncated length-delimited field")
      value, pos = buf[pos:pos + size], pos + size
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = buf[pos:pos + size], pos + size
    else:
      raise RecordProblem(f"unsupported protobuf wire type {wire}")
    yield number, wire, value


def parse_example(data: bytes) -> dict[str, list]:
  """The features of a serialized `tf.train.Example`.

  Args:
    data: the record payload.

  Returns:
    {feature name: list of values}; bytes lists give bytes, int64 lists
    give ints, float lists give the raw 4-byte little-endian floats.

  Raises:
    RecordProblem: the payload is not an Example.
  """
  features = {}
  for number, wire, value in _fields(data):
    if number != 1 or wire != 2:
      continue
    for entry_number, entry_wire, entry in _fields(value):
      if entry_number != 1 or entry_wire != 2:
        continue
      key, feature = None, b""
      for n, w, v in _fields(entry):
        if n == 1 and w == 2:
          key = v.decode("utf-8", errors="replace")
        elif n == 2 and w == 2:
          feature = v
      if key is None:
        raise RecordProblem("feature map entry without a key")
      features[key] = _feature_values(feature)
  return features


def _feature_values(feature: bytes) -> list:
  values = []
  for kind, _, inner in _fields(feature):
    for n, w, v in _fields(inner):
      if n != 1:
        continue
      if kind == 1:
        values.append(v)
      elif kind == 3 and w == 2:  # packed int64s
        pos = 0
        while pos < len(v):
          x, pos = _varint(v, pos)
          values.append(x - (1 << 64) if x >> 63 else x)
      elif kind == 3:
        values.append(v - (1 << 64) if v >> 63 else v)
      elif kind == 2 and w == 2:
        values.extend(v[i:i + 4] for i in range(0, len(v), 4))
      else:
        values.append(v)
  return values
