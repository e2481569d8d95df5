"""Quick, Draw!: one `<class>.npy` bitmap array per class.

Raw layout: `<data_root>/<class>.npy` (the "numpy_bitmap" files of the
Quick, Draw! dataset, 345 classes), each an array [num_images, 784] of
28x28 greyscale drawings (0/1 arrays are scaled to 0/255). The class name
is the file name up to its first dot; classes are split 70%/15%/15% over
the sorted names. Every row becomes an RGB JPEG, in array order.
"""

import os

import numpy as np
from PIL import Image

from meta_dataset_pipeline.conversion import common


def images_from_npy(path: str):
  """Yields the JPEG of every row of a class's bitmap array."""
  try:
    # Memory-mapped: some classes hold several hundred thousand drawings.
    rows = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise common.ConversionError(f"cannot read {path}: {e}") from None
  side = int(np.sqrt(rows.shape[1]))
  for row in rows:
    if row.dtype == bool:
      row = row.astype(np.uint8) * np.uint8(255)
    img = Image.fromarray(np.ascontiguousarray(row).reshape(side, side))
    yield common.to_jpeg(img.convert("RGB"))


def plan(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of a Quick, Draw! numpy_bitmap download."""
  common.require_dir(data_root, "the Quick, Draw! numpy_bitmap folder")

  def make_splits():
    files = common.sorted_listdir(data_root)
    names = sorted(f[:f.find(".")] for f in files)
    num_trainval = int(0.85 * len(names))
    num_train = int(0.7 * len(names))
    return common.index_splits(
        names, (num_train, num_trainval - num_train,
                len(names) - num_trainval), "Quick, Draw! classes")

  splits = common.load_or_make_splits(splits_root, "quickdraw", make_splits)
  jobs = []
  for class_id, name in enumerate(common.split_class_names(splits)):
    path = common.require_file(os.path.join(data_root, name + ".npy"),
                               f"the Quick, Draw! bitmaps of class {name!r}")
    try:
      count = len(np.load(path, mmap_mode="r"))
    except (OSError, ValueError) as e:
      raise common.ConversionError(f"cannot read {path}: {e}") from None
    jobs.append(common.ClassJob(class_id, name, images_from_npy, (path,),
                                count))
  return common.Plan("quickdraw", jobs,
                     common.flat_spec_fn("quickdraw", splits))
