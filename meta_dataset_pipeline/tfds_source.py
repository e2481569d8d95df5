"""Meta-Dataset prepared by the official TFDS builder, read as class streams.

The official builder (`meta_dataset/data/tfds/md_tfds.py` upstream, run as
`tfds build`) writes each source as the dataset `meta_dataset`, builder
config `<source>`, with one split `all_classes` whose examples are sorted by
class (train classes, then valid, then test); its metadata holds the
official dataset spec of each benchmark version (`dataset_specs["v1"]`) and
the `[start, stop)` example range of every class of every meta-split
(`relative_class_slices[version][split][relative label]`). So class `c`
is a contiguous slice of the split, and record `i` of class `c` is example
`start_c + i`.

This module turns such a source into the same spec + class streams the
TFRecord path uses (`reader.py`): the spec comes from the metadata, so the
sampler is unchanged; each class stream keeps the records path's per-class
shuffled passes and flushes (`reader.ClassStream.take`), and reads example
`start_c + i` through tensorflow-datasets' random-access reader
(`builder.as_data_source`; the example's image bytes stay encoded). For the same seed an
episode therefore takes the same classes and record indices as from the
TFRecord files the data came from, and the same image bytes.

Why random access (`as_data_source`) and not `as_dataset` with a slice per
class (what upstream's TFDS episode pipeline does): episodes take a few
records of a class in a reshuffled order, and a slice dataset can only be
read from its start; upstream builds one such dataset per class (tens of
seconds for ImageNet's 712 train classes) and reads through the records it
throws away. Random access needs nothing per class, and reads only what an
episode keeps. It needs the `array_record` file format (`tfds build
--file_format=array_record`; a `tfrecord` build converts in place with `tfds
convert_format`, whose module imports apache-beam), which is checked when
the source is opened.
"""

import dataclasses
import threading
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import reader

DATASET_NAME = "meta_dataset"  # The official builder's name.
SPLIT = "all_classes"          # Its only split.
MD_VERSIONS = ("v1", "v2")


class TfdsSourceError(ValueError):
  """A TFDS-prepared source that cannot be read as Meta-Dataset classes."""


class TfdsRecords:
  """Random access to the examples of one TFDS-prepared source.

  Attributes:
    location: the prepared dataset's folder (for messages).
    slices: absolute class id -> (start, stop) example range.
    total_examples: examples in the split.
  """

  def __init__(self, builder, slices: dict[int, tuple[int, int]]):
    self._builder = builder
    self.location = str(builder.data_dir)
    self.slices = slices
    self.total_examples = builder.info.splits[SPLIT].num_examples
    self._source = None
    self._lock = threading.Lock()

  def describe(self, class_id: int) -> str:
    """Where class `class_id` lives, for error messages."""
    start, stop = self.slices[class_id]
    return f"{self.location} ({SPLIT}[{start}:{stop}])"

  def _data_source(self):
    """tfds' random-access reader of the split, opened on first use.

    It returns each example serialized: the `tf.train.Example` that tfds
    writes for these features holds the JPEG bytes under `image` and the
    class under `label`, as a record of the records path does, so the same
    parser reads both (`decoder.parse_record`, about 6 us; tfds' own
    deserialization takes about 50 us, in the one generator thread that
    reads every episode).
    """
    with self._lock:
      if self._source is None:
        self._source = self._builder.as_data_source(
            SPLIT,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
      return self._source

  def read(self, class_id: int, index: int) -> bytes:
    """The serialized example number `index` of class `class_id`."""
    start, stop = self.slices[class_id]
    if not 0 <= index < stop - start:
      raise IndexError(f"record {index} of a class of {stop - start}")
    return self._data_source()[start + index]


class TfdsClassStream(reader.ClassStream):
  """A class's records from a TFDS-prepared source.

  Shuffled passes and flushes (`take`) and the checks of each record read
  (`read_image`: an `image`/`label` Example carrying the class's id, image
  bytes that look like an image) are the records path's, inherited, so the
  same seed picks the same record indices; only `read` differs.
  """

  def __init__(self, records: TfdsRecords, class_id: int,
               rng: np.random.Generator, shuffle_buffer_size: int):
    start, stop = records.slices[class_id]
    super().__init__(records.describe(class_id), stop - start, class_id, rng,
                     shuffle_buffer_size)
    self._records = records

  def ensure_open(self):
    """Nothing to index: the class is a known contiguous range."""

  def close(self):
    """The shared data source stays open; nothing per class."""

  def read(self, index: int) -> bytes:
    """The serialized example of record `index`: a `tf.train.Example` with
    `image` and `label`, which `read_image` parses and checks as it does a
    TFRecord's."""
    try:
      return self._records.read(self.class_id, index)
    except (OSError, RuntimeError, IndexError) as e:
      raise reader.RecordError(f"{self.path}: record {index} of class "
                               f"{self.class_id} cannot be read: {e}"
                               ) from None


class _TfdsMixin:
  """What a spec backed by TFDS data answers differently from files."""

  def class_file(self, class_id: int) -> str:
    """Where class `class_id` is read from (shown in errors)."""
    return self.records.describe(class_id)

  def check_split(self, split) -> list[str]:
    """The split's classes exist in the data with the spec's counts.

    Cheap (metadata only): the example ranges must be the spec's counts
    and lie inside the split; examples are checked when read.
    """
    total = self.records.total_examples
    for c in self.get_classes(split):
      start, stop = self.records.slices.get(c, (0, -1))
      if stop - start != self.get_total_images_per_class(c) or stop > total:
        raise TfdsSourceError(
            f"{self.records.location}: class {c} has the example range "
            f"[{start}, {stop}) but the spec lists "
            f"{self.get_total_images_per_class(c)} images and the split "
            f"{SPLIT} holds {total}")
    return [self.class_file(c) for c in self.get_classes(split)]

  def open_class_streams(self, split, rngs, shuffle_buffer_size):
    """One `TfdsClassStream` per class of `split` (hook of `reader`)."""
    self.check_split(split)
    return [TfdsClassStream(self.records, c, rng, shuffle_buffer_size)
            for c, rng in zip(self.get_classes(split), rngs)]


_RECORDS = dataclasses.field(default=None, compare=False, repr=False)


# The usual spec types plus the TFDS records: isinstance checks (which the
# sampler uses to pick the ontology) still see the base type.
@dataclasses.dataclass(frozen=True)
class TfdsDatasetSpecification(_TfdsMixin, spec_lib.DatasetSpecification):
  records: Any = _RECORDS


@dataclasses.dataclass(frozen=True)
class TfdsBiLevelDatasetSpecification(_TfdsMixin,
                                      spec_lib.BiLevelDatasetSpecification):
  records: Any = _RECORDS


@dataclasses.dataclass(frozen=True)
class TfdsHierarchicalDatasetSpecification(
    _TfdsMixin, spec_lib.HierarchicalDatasetSpecification):
  records: Any = _RECORDS


_SPEC_CLASSES = {
    spec_lib.DatasetSpecification: TfdsDatasetSpecification,
    spec_lib.BiLevelDatasetSpecification: TfdsBiLevelDatasetSpecification,
    spec_lib.HierarchicalDatasetSpecification:
        TfdsHierarchicalDatasetSpecification,
}


def source_dir(data_dir: str, source: str) -> epath.Path:
  """`<data_dir>/meta_dataset/<source>`, where `tfds build` writes it."""
  return epath.Path(data_dir) / DATASET_NAME / source


def load_tfds_spec(data_dir: str, source: str, md_version: str = "v1"):
  """The dataset spec of a TFDS-prepared source, reading from its data.

  Args:
    data_dir: the TFDS data dir given to `tfds build` (`--data_dir`),
      holding `meta_dataset/<source>/<version>/`.
    source: the builder config, e.g. "dtd", "ilsvrc_2012".
    md_version: the benchmark version of the splits, "v1" (the Meta-Dataset
      paper) or "v2" (VTAB+MD).

  Returns:
    A spec of the usual type (flat, bi-level or hierarchical) whose class
    streams read the TFDS data; pass it to the episode pipelines like a
    spec from `load_dataset_spec`.

  Raises:
    FileNotFoundError: nothing prepared for `source` under `data_dir`.
    TfdsSourceError: the data is not random-access (a `tfrecord` build) or
      its metadata lacks `md_version` or does not fit the spec.
  """
  if md_version not in MD_VERSIONS:
    raise TfdsSourceError(f"md_version must be one of {MD_VERSIONS}, got "
                          f"{md_version!r}")
  folder = source_dir(data_dir, source)
  if not folder.is_dir():
    raise FileNotFoundError(
        f"TFDS-prepared source '{source}' not found: {folder} is not a "
        "directory (check config.data.records_root, the TFDS data_dir)")
  try:
    builder = tfds.builder(f"{DATASET_NAME}/{source}", data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"TFDS-prepared source '{source}': {folder} holds no prepared "
        "version (dataset_info.json)") from None
  location = builder.data_dir
  formats = builder.info.available_file_formats()
  if not formats & tfds.core.file_adapters.FileFormat.with_random_access():
    raise TfdsSourceError(
        f"{location} is stored as {sorted(f.value for f in formats)}, which "
        "has no random access: build it with `tfds build "
        "--file_format=array_record`, or convert it in place with `tfds "
        f"convert_format --dataset_version_dir={location} "
        "--out_file_format=array_record` (needs apache-beam installed)")
  metadata = builder.info.metadata or {}
  missing = [k for k in ("dataset_specs", "relative_class_slices")
             if md_version not in (metadata.get(k) or {})]
  if missing:
    raise TfdsSourceError(
        f"{location}/metadata.json has no {md_version!r} entry in "
        f"{missing}: not prepared by the Meta-Dataset builder, or the "
        f"source has no {md_version} splits")
  spec = spec_lib.spec_from_dict(metadata["dataset_specs"][md_version],
                                 str(location),
                                 f"{location}/metadata.json:dataset_specs."
                                 f"{md_version}")
  relative = metadata["relative_class_slices"][md_version]
  slices = {}
  for split in spec_lib.Split:
    # JSON keys are strings; the builder's in-memory metadata uses ints.
    by_label = {int(k): v for k, v in
                (relative.get(split.name.lower()) or {}).items()}
    for rel, class_id in enumerate(spec.get_classes(split)):
      if rel in by_label:
        start, stop = by_label[rel]
        slices[class_id] = (int(start), int(stop))
  records = TfdsRecords(builder, slices)
  fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
  return _SPEC_CLASSES[type(spec)](records=records, **fields)


def load_tfds_specs(data_dir: str, sources, md_version: str = "v1"):
  """`load_tfds_spec` of each source."""
  return [load_tfds_spec(data_dir, s, md_version) for s in sources]
