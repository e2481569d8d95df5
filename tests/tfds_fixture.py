"""A small TFDS-prepared Meta-Dataset source, written by tensorflow-datasets.

The official builder (`meta_dataset/data/tfds/md_tfds.py` upstream) converts
the raw datasets, which tests cannot download. This builder writes what it
writes, with tensorflow-datasets' own writer, from a folder of Meta-Dataset
records instead: dataset name `meta_dataset`, one builder config per source,
version 1.0.0, the single split `all_classes` holding the examples sorted by
class (train classes, then valid, then test; `disable_shuffling`), the same
features (`image` JPEG, `format`, `filename`, `label`, `class_name`) and the
same metadata (`dataset_specs`, `relative_class_slices`,
`meta_split_slices`, `class_slices`, `class_names`, `total_num_examples`).
"""

import json
import pathlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import decoder

_SPLITS = ("train", "valid", "test")


def _metadata(spec_dict, spec) -> dict:
  """The official metadata layout, computed from one ("v1") spec."""
  classes = {s: list(spec.get_classes(s)) for s in _SPLITS}
  counts = [spec.get_total_images_per_class(c)
            for s in _SPLITS for c in classes[s]]
  bounds = np.cumsum([0] + counts).tolist()
  # Keyed by position in the train+valid+test order, which is the absolute
  # class id since ids are contiguous in that order.
  class_slices = {i: (bounds[i], bounds[i + 1]) for i in range(len(counts))}
  relative = {s: {rel: class_slices[c] for rel, c in enumerate(classes[s])}
              for s in _SPLITS}
  split_slices = {}
  for s in _SPLITS:
    if classes[s]:
      split_slices[s] = (class_slices[classes[s][0]][0],
                         class_slices[classes[s][-1]][1])
    else:
      split_slices[s] = None
  names = [spec.class_names[c] for c in range(len(counts))]
  return dict(meta_split_slices={"v1": split_slices},
              relative_class_slices={"v1": relative},
              dataset_specs={"v1": spec_dict}, class_names=names,
              total_num_examples=bounds[-1], class_slices=class_slices)


def _builder_class(records_dir: pathlib.Path):
  """A builder class whose one config is the source in `records_dir`."""
  spec = spec_lib.load_dataset_spec(str(records_dir))
  spec_dict = json.loads(
      (pathlib.Path(records_dir) / spec_lib.SPEC_FILENAME).read_text())

  class MetaDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Meta-Dataset source, as the official builder lays it out."""
    name = "meta_dataset"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=spec.name)]

    def _info(self):
      metadata = _metadata(spec_dict, spec)
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(encoding_format="jpeg"),
              "format": tfds.features.Text(),
              "filename": tfds.features.Text(),
              "label": tfds.features.ClassLabel(
                  num_classes=len(metadata["class_names"])),
              "class_name": tfds.features.Text(),
          }),
          metadata=tfds.core.MetadataDict(**metadata),
          disable_shuffling=True,
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"all_classes": self._generate_examples()}

    def _generate_examples(self):
      key = 0
      for class_id in range(spec.num_classes):
        path = spec.class_file(class_id)
        for i, record in enumerate(tf.data.TFRecordDataset(path)):
          image, label = decoder.parse_record(record.numpy())
          yield key, {"image": image, "format": "JPEG",
                      "filename": f"{class_id}.tfrecords[{i}]",
                      "label": label, "class_name": spec.class_names[label]}
          key += 1

  return MetaDataset


def prepare(records_dir: pathlib.Path, data_dir: pathlib.Path,
            file_format: str = "array_record") -> pathlib.Path:
  """Writes the source in `records_dir` under `data_dir` (TFDS layout).

  Returns:
    The dataset folder, `data_dir/meta_dataset/<source>/1.0.0`.
  """
  builder = _builder_class(records_dir)(data_dir=str(data_dir),
                                        file_format=file_format)
  builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)
