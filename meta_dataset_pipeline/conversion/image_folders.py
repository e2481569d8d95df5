"""Sources stored as one folder of image files per class.

- dtd: `<data_root>/images/<class>/*.jpg` (DTD's `dtd-r1.0.1.tar.gz`
  unpacked). 47 classes, split 33/7/7 over the sorted class names. The
  stray `waffled/.directory` file of the release is skipped.
- cu_birds: `<data_root>/images/<class>/*.jpg` and `<data_root>/classes.txt`
  (CUB_200_2011 unpacked). 200 classes in `classes.txt` order, split
  140/30/30.
- traffic_sign: `<data_root>/Final_Training/Images/<00000..00042>/*.ppm`
  (GTSRB_Final_Training_Images.zip unpacked; data_root is `GTSRB`). All 43
  classes are test classes, named from the official label list; each
  class's images are shuffled with a seeded `RandomState(23)` (they come as
  30-frame tracks of one sign) and re-encoded from PPM to JPEG; the
  `GT-<class>.csv` annotation file is skipped.

Images are stored as the file bytes when they are RGB JPEGs, else converted
to RGB and re-encoded as JPEG (`common.image_record`). Records follow the
sorted file names unless shuffled.
"""

import os

import numpy as np

from meta_dataset_pipeline.conversion import common
from meta_dataset_pipeline.conversion import labels


def _folder_job(class_id, name, folder, skip=(), shuffle_seed=None):
  files = common.directory_files(folder, skip)
  if shuffle_seed is not None:
    np.random.RandomState(shuffle_seed).shuffle(files)
  return common.ClassJob(class_id, name, common.images_from_files,
                         (files,), len(files))


def _plan_folders(name, splits, folder_fn):
  names = common.split_class_names(splits)
  jobs = []
  for class_id, class_name in enumerate(names):
    folder, skip, seed = folder_fn(class_id, class_name)
    common.require_dir(folder, f"the image folder of {name} class "
                       f"{class_name!r}")
    jobs.append(_folder_job(class_id, class_name, folder, skip, seed))
  return common.Plan(name, jobs, common.flat_spec_fn(name, splits))


def plan_dtd(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of a DTD download."""
  images = common.require_dir(
      os.path.join(data_root, "images"),
      "DTD's images folder (dtd-r1.0.1.tar.gz unpacked; data_root is dtd/)")

  def make_splits():
    names = common.sorted_listdir(images)
    return common.index_splits(names, (33, 7, 7), "DTD classes in " + images)

  splits = common.load_or_make_splits(splits_root, "dtd", make_splits)
  return _plan_folders(
      "dtd", splits,
      lambda i, n: (os.path.join(images, n),
                    (".directory",) if n == "waffled" else (), None))


def plan_cu_birds(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of a CUB-200-2011 download."""
  images = common.require_dir(
      os.path.join(data_root, "images"),
      "CU-Birds' images folder (CUB_200_2011.tgz unpacked; data_root is "
      "CUB_200_2011/)")

  def make_splits():
    path = common.require_file(os.path.join(data_root, "classes.txt"),
                               "CU-Birds' classes.txt")
    with open(path, encoding="utf-8") as f:
      names = [line.strip().split(" ")[1] for line in f if line.strip()]
    return common.index_splits(names, (140, 30, 30), "classes in " + path)

  splits = common.load_or_make_splits(splits_root, "cu_birds", make_splits)
  return _plan_folders("cu_birds", splits,
                       lambda i, n: (os.path.join(images, n), (), None))


def plan_traffic_sign(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of a GTSRB training-set download."""
  images = common.require_dir(
      os.path.join(data_root, "Final_Training", "Images"),
      "GTSRB's Final_Training/Images folder "
      "(GTSRB_Final_Training_Images.zip unpacked; data_root is GTSRB/)")

  def make_splits():
    return {"train": [], "valid": [],
            "test": [f"{i:02d}.{n}"
                     for i, n in enumerate(labels.TRAFFIC_SIGN_LABELS)]}

  splits = common.load_or_make_splits(splits_root, "traffic_sign",
                                      make_splits)
  # The class id, not the name, picks the folder, as in the official code.
  return _plan_folders(
      "traffic_sign", splits,
      lambda i, n: (os.path.join(images, f"{i:05d}"),
                    (f"GT-{i:05d}.csv",), common.SPLIT_SEED + 1))

