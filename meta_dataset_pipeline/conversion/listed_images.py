"""Sources whose annotation files list each class's images.

- vgg_flower: `<data_root>/jpg/image_NNNNN.jpg` and
  `<data_root>/imagelabels.mat` (102flowers.tgz and imagelabels.mat). The
  `labels` vector gives the class (1..102) of image N; a class's records
  follow the image numbers. Split 71/15/16 over the classes; class names
  are `NNN.<label>`.
- aircraft: `<data_root>/data/{images/*.jpg, images_box.txt,
  images_variant_trainval.txt, images_variant_test.txt, variants.txt}`
  (fgvc-aircraft-2013b.tar.gz; data_root is fgvc-aircraft-2013b/). Classes
  are the variants (100, sorted, split 70/15/15); a class's images are its
  sorted image names, each cropped to its box (which also drops the
  copyright banner) and re-encoded as JPEG.
- fungi: `<data_root>/{train.json, val.json, images/...}` (the FGVCx 2018
  fungi images and annotations). Classes are the categories in id order,
  named `NNNN.<name>` (1394, split 994/200/200); a class's images follow
  the order of `train.json`'s then `val.json`'s image lists.

Images are stored as file bytes when they are RGB JPEGs and are not
cropped, else re-encoded (`common.image_record`).
"""

import collections
import os

from meta_dataset_pipeline.conversion import common
from meta_dataset_pipeline.conversion import labels


def _listed_plan(name, splits, files_of, bboxes_of=None):
  jobs = []
  for class_id, class_name in enumerate(common.split_class_names(splits)):
    files = files_of(class_name)
    bboxes = None if bboxes_of is None else bboxes_of(class_name)
    jobs.append(common.ClassJob(class_id, class_name,
                                common.images_from_files, (files, bboxes),
                                len(files)))
  return common.Plan(name, jobs, common.flat_spec_fn(name, splits))


def plan_vgg_flower(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of a VGG Flower (102 categories) download."""
  # Lazy: scipy is needed for this source only.
  import scipy.io  # pylint: disable=g-import-not-at-top
  mat_path = common.require_file(
      os.path.join(data_root, "imagelabels.mat"),
      "VGG Flower's imagelabels.mat")
  jpg = common.require_dir(os.path.join(data_root, "jpg"),
                           "VGG Flower's jpg folder (102flowers.tgz unpacked)")

  def make_splits():
    names = [f"{i + 1:03d}.{n}" for i, n in
             enumerate(labels.VGG_FLOWER_LABELS)]
    return common.index_splits(names, (71, 15, 16), "VGG Flower classes")

  splits = common.load_or_make_splits(splits_root, "vgg_flower", make_splits)
  try:
    image_labels = scipy.io.loadmat(mat_path)["labels"][0]
  except (ValueError, KeyError, IndexError, OSError) as e:
    raise common.ConversionError(
        f"cannot read the 'labels' vector of {mat_path}: {e}") from None
  files = collections.defaultdict(list)
  for i, label in enumerate(image_labels):
    files[int(label)].append(os.path.join(jpg, f"image_{i + 1:05d}.jpg"))
  # The class number is the name's 3-digit prefix.
  return _listed_plan("vgg_flower", splits, lambda n: files[int(n[:3])])


def _read_lines(path, what):
  common.require_file(path, what)
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


def plan_aircraft(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of an FGVC-Aircraft 2013b download."""
  data = common.require_dir(
      os.path.join(data_root, "data"),
      "FGVC-Aircraft's data folder (fgvc-aircraft-2013b.tar.gz unpacked; "
      "data_root is fgvc-aircraft-2013b/)")

  def make_splits():
    variants = sorted(
        v.strip() for v in _read_lines(os.path.join(data, "variants.txt"),
                                       "FGVC-Aircraft's data/variants.txt"))
    return common.index_splits(variants, (70, 15, 15),
                               "variants in data/variants.txt")

  splits = common.load_or_make_splits(splits_root, "aircraft", make_splits)
  boxes = {}
  box_file = os.path.join(data, "images_box.txt")
  for line in _read_lines(box_file, "FGVC-Aircraft's data/images_box.txt"):
    fields = line.split(" ")
    if len(fields) != 5:
      raise common.ConversionError(
          f"expected '<image> <xmin> <ymin> <xmax> <ymax>' lines in "
          f"{box_file}, got {line!r}")
    boxes[fields[0]] = tuple(int(v) for v in fields[1:])
  variant_of = {}
  for part in ("trainval", "test"):
    path = os.path.join(data, f"images_variant_{part}.txt")
    for line in _read_lines(path, f"FGVC-Aircraft's data/"
                            f"images_variant_{part}.txt"):
      image, variant = line.split(" ", 1)
      variant_of[image] = variant
  images_of = collections.defaultdict(list)
  for image, variant in variant_of.items():
    images_of[variant].append(image)
  class_names = common.split_class_names(splits)
  if set(images_of) != set(class_names):
    raise common.ConversionError(
        f"the variants of {data}/images_variant_*.txt do not match the "
        f"{len(class_names)} classes of the aircraft split file")
  missing = [i for i in variant_of if i not in boxes]
  if missing:
    raise common.ConversionError(
        f"{box_file} has no box for image {missing[0]}")
  images = os.path.join(data, "images")
  return _listed_plan(
      "aircraft", splits,
      lambda n: [os.path.join(images, i + ".jpg")
                 for i in sorted(images_of[n])],
      lambda n: [boxes[i] for i in sorted(images_of[n])])


def plan_fungi(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of the FGVCx 2018 fungi download."""
  train = common.read_json(os.path.join(data_root, "train.json"),
                           "fungi's train.json (train_val_annotations.tgz)")
  val = common.read_json(os.path.join(data_root, "val.json"),
                         "fungi's val.json (train_val_annotations.tgz)")
  if train["categories"] != val["categories"]:
    raise common.ConversionError(
        f"train.json and val.json in {data_root} list different categories")
  categories = sorted(train["categories"], key=lambda c: c["id"])
  if [c["id"] for c in categories] != list(range(len(categories))):
    raise common.ConversionError(
        f"the category ids of {data_root}/train.json are not 0..N-1")

  def make_splits():
    # Names carry the id: some categories share a name.
    names = [f"{c['id']:04d}.{c['name']}" for c in categories]
    return common.index_splits(names, (994, 200, 200), "fungi categories")

  splits = common.load_or_make_splits(splits_root, "fungi", make_splits)
  images = train["images"] + val["images"]
  category_of = {}
  for annotation in train["annotations"] + val["annotations"]:
    category_of[annotation["image_id"]] = annotation["category_id"]
  files = collections.defaultdict(list)
  for image in images:
    if image["id"] not in category_of:
      raise common.ConversionError(
          f"fungi image {image['file_name']} has no annotation")
    files[category_of[image["id"]]].append(
        os.path.join(data_root, image["file_name"]))
  for name in common.split_class_names(splits):
    if int(name[:4]) not in files:
      raise common.ConversionError(
          f"no fungi image of class {name!r} in {data_root}/train.json or "
          f"val.json")
  return _listed_plan("fungi", splits, lambda n: files[int(n[:4])])
