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

These helpers write exactly that, for a flat `DatasetSpecification` (no
class hierarchy). Every file is written to a temporary name in the same folder
and renamed into place when complete, so an interrupted run never leaves a
truncated file under a final name.
"""

import contextlib
import json
import os
import uuid
from typing import Iterable, Iterator, Mapping, Sequence

import tensorflow as tf

FILE_PATTERN = "{}.tfrecords"
DATASET_SPEC_FILENAME = "dataset_spec.json"
# Order of `classes_per_split`, as the official `Split` enum lists it.
SPLITS = ("TRAIN", "VALID", "TEST")
# Prefix of temporary files; readers never match it (it is not `<int>.*`).
TMP_PREFIX = ".tmp-"


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


def serialize_example(image_bytes: bytes, label: int) -> bytes:
  """Serializes one record as the official converters do.

  Args:
    image_bytes: the encoded image (JPEG or PNG bytes).
    label: the absolute class id.

  Returns:
    A serialized `tf.train.Example` with features `image` and `label` only.
  """
  example = tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      "label": tf.train.Feature(
          int64_list=tf.train.Int64List(value=[int(label)])),
  }))
  # `feature` is a protobuf map, whose default wire order is unspecified
  # (the official fixtures hold both orders). `deterministic=True` sorts the
  # keys, so the same inputs always give the same bytes; any order parses
  # identically.
  return example.SerializeToString(deterministic=True)


def class_records_path(records_dir: str, class_id: int) -> str:
  """Returns the path of the record file of class `class_id`."""
  return os.path.join(records_dir, FILE_PATTERN.format(int(class_id)))


def write_class_records(records_dir: str, class_id: int,
                        images: Iterable[bytes]) -> int:
  """Writes the record file of one class, atomically.

  Args:
    records_dir: the dataset folder; must exist.
    class_id: the absolute class id; also the file's name.
    images: the encoded images of the class, in record order.

  Returns:
    The number of records written.
  """
  count = 0
  with atomic_output_path(class_records_path(records_dir, class_id)) as tmp:
    # No compression: the official reader opens the files uncompressed.
    with tf.io.TFRecordWriter(tmp) as writer:
      for image_bytes in images:
        writer.write(serialize_example(image_bytes, class_id))
        count += 1
  return count


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
