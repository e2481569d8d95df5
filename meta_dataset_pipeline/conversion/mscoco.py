"""MSCOCO: object crops from the 2017 training images.

Raw layout: `<data_root>/train2017/<12-digit image id>.jpg` and
`<data_root>/instances_train2017.json` (train2017.zip and
annotations_trainval2017.zip unpacked). Every instance annotation becomes
one record of its category: its box, grown 1.2 times about its centre and
clipped to the image, cropped from the RGB image and stored as JPEG; a box
left empty by the clipping is skipped. The 80 categories are split 0/40/40
in the annotation file's category order; a class's records follow the
annotation order. As the official converter, a file is written for each of
the 80 class ids, and `images_per_class` lists only classes with images,
in the order of their first kept crop.
"""

import dataclasses
import os

from PIL import Image

from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline.conversion import common

NUM_CLASSES = 80
BOX_SCALE = 1.2


def crop_box(bbox, image_w, image_h, scale=BOX_SCALE):
  """PIL crop box of a COCO box (x, y, w, h) grown `scale` times."""
  x, y, w, h = bbox
  x = x - 0.5 * w * (scale - 1.0)
  y = y - 0.5 * h * (scale - 1.0)
  w = w * scale
  h = h * scale
  # COCO puts pixel centres at half-integers, PIL at integers: shift by
  # half a pixel, and make the right/bottom edges inclusive.
  return (max(int(round(x - 0.5)), 0), max(int(round(y - 0.5)), 0),
          min(int(round(x + w - 0.5)) + 1, image_w),
          min(int(round(y + h - 0.5)) + 1, image_h))


def _crop(path, bbox):
  """The RGB crop of an annotation, or None when it is dropped."""
  try:
    with open(path, "rb") as f:
      image = Image.open(f)
      image = image.convert(mode="RGB")
  except FileNotFoundError:
    raise common.ConversionError(
        f"expected the MSCOCO image {path} (no such file)") from None
  except OSError:
    return None  # Unreadable images are skipped, as the official converter.
  left, top, right, bottom = crop_box(bbox, *image.size)
  if right - left <= 0 or bottom - top <= 0:
    return None
  return image.crop((left, top, right, bottom))


def images_from_boxes(items):
  """Yields the JPEG crop of every (index, image path, COCO box) kept."""
  for _, path, bbox in items:
    crop = _crop(path, bbox)
    if crop is not None:
      yield common.to_jpeg(crop)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Flat spec with the official key order of `images_per_class`."""
  classes_per_split: dict
  class_names: tuple
  items: tuple  # per class id: its (annotation index, path, box)

  def __call__(self, counts, path):
    spec = records_writer.dataset_spec_dict(
        "mscoco", self.classes_per_split,
        [counts[i] for i in range(len(self.class_names))], self.class_names,
        path)
    # The official converter adds a class to `images_per_class` when it
    # writes the class's first crop: order the classes by the annotation
    # index of their first kept crop (usually their first annotation).
    first_kept = {}
    for class_id in range(len(self.class_names)):
      if counts[class_id]:
        first_kept[class_id] = next(
            index for index, image, box in self.items[class_id]
            if _crop(image, box) is not None)
    spec["images_per_class"] = {
        str(i): counts[i] for i in sorted(first_kept, key=first_kept.get)}
    return spec


def plan(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of the MSCOCO 2017 training set."""
  image_dir = common.require_dir(
      os.path.join(data_root, "train2017"),
      "MSCOCO's train2017 image folder (train2017.zip unpacked)")
  coco = common.read_json(
      os.path.join(data_root, "instances_train2017.json"),
      "MSCOCO's instances_train2017.json "
      "(annotations_trainval2017.zip unpacked)")
  categories = coco.get("categories", [])
  if len(categories) != NUM_CLASSES:
    raise common.ConversionError(
        f"expected {NUM_CLASSES} categories in instances_train2017.json, "
        f"found {len(categories)}")
  if not coco.get("annotations"):
    raise common.ConversionError(
        "instances_train2017.json holds no instance annotations")

  def make_splits():
    return common.index_splits([c["name"] for c in categories],
                               (0, 40, 40), "MSCOCO categories")

  splits = common.load_or_make_splits(splits_root, "mscoco", make_splits)
  class_names = common.split_class_names(splits)
  id_of_name = {c["name"]: c["id"] for c in categories}
  unknown = [n for n in class_names if n not in id_of_name]
  if unknown:
    raise common.ConversionError(
        f"the mscoco split file names categories that "
        f"instances_train2017.json lacks: {unknown[:3]}")
  class_of_coco_id = {id_of_name[n]: i for i, n in enumerate(class_names)}
  items = [[] for _ in range(max(NUM_CLASSES, len(class_names)))]
  for index, annotation in enumerate(coco["annotations"]):
    class_id = class_of_coco_id.get(annotation["category_id"])
    if class_id is None:
      raise common.ConversionError(
          f"MSCOCO category {annotation['category_id']} is in no split of "
          f"the mscoco split file")
    items[class_id].append((
        index, os.path.join(image_dir, "%012d.jpg" % annotation["image_id"]),
        tuple(annotation["bbox"])))
  jobs = [common.ClassJob(i, class_names[i] if i < len(class_names) else "",
                          images_from_boxes, (tuple(it),), len(it))
          for i, it in enumerate(items)]
  per_split = {k.upper(): len(splits[k]) for k in common.SPLIT_KEYS}
  return common.Plan("mscoco", jobs,
                     _Spec(per_split, tuple(class_names),
                           tuple(tuple(it) for it in items)))
