"""Writes the tiny raw downloads that md-convert's equality tests convert.

Each source gets a folder `raw/<source>/` in the layout its official
converter reads (see `meta_dataset_pipeline/conversion/<source>.py`), and a
split file `splits/<source>_splits.json` naming only the few classes made
here (both converters read an existing split file instead of drawing one).
Images are tiny (a few hundred bytes) and seeded, but they are committed:
a different Pillow could encode them differently, and the official records
in `official/` were made from these exact bytes.

Run from the repository root: `python tests/md_convert_fixtures/make_raw.py
[source ...]` (it refuses to overwrite an existing `raw/<source>`);
`--materialize_ilsvrc DEST` writes the full ILSVRC tree (see
`materialize_ilsvrc`).
"""

import gzip
import io
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
import scipy.io

HERE = os.path.dirname(os.path.abspath(__file__))
OMNIGLOT_VALID = ("Blackfoot_(Canadian_Aboriginal_Syllabics)",
                  "Ojibwe_(Canadian_Aboriginal_Syllabics)",
                  "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog",
                  "Alphabet_of_the_Magi")


def _pixels(rng, h, w, channels=3):
  """A smooth gradient plus noise, so JPEG does some real work."""
  y, x = np.mgrid[0:h, 0:w]
  base = rng.uniform(0, 255, size=channels)
  slope = rng.uniform(-12, 12, size=(2, channels))
  img = (base + y[..., None] * slope[0] + x[..., None] * slope[1] +
         rng.normal(0, 18, size=(h, w, channels)))
  img = np.clip(img, 0, 255).astype(np.uint8)
  return img[..., 0] if channels == 1 else img


def _save(path, array, fmt, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(array)
  if mode is not None:
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def omniglot(root, rng):
  """30 background and 20 evaluation alphabets, as the converter demands."""
  background = [f"Train_{i:02d}" for i in range(25)] + list(OMNIGLOT_VALID)
  evaluation = [f"Test_{i:02d}" for i in range(20)]
  for folder, alphabets in (("images_background", background),
                            ("images_evaluation", evaluation)):
    for a, alphabet in enumerate(alphabets):
      num_chars = 2 if a % 7 == 0 else 1
      for c in range(num_chars):
        char_dir = os.path.join(root, folder, alphabet, f"character{c + 1:02d}")
        num_images = 2 if (a + c) % 5 == 0 else 1
        for d in range(num_images):
          strokes = rng.uniform(size=(10, 10)) < 0.8  # black on white
          _save(os.path.join(char_dir, f"{a:02d}{c:02d}_{d + 1:02d}.png"),
                strokes, "PNG", mode="1")


def dtd(root, rng, splits):
  classes = ("banded", "waffled", "zigzagged", "cracked")
  for k, name in enumerate(classes):
    for i in range(3 if k != 3 else 2):
      path = os.path.join(root, "images", name, f"{name}_{i + 1:04d}.jpg")
      if name == "zigzagged" and i == 1:
        _save(path, _pixels(rng, 9, 11, channels=1), "JPEG")  # greyscale
      else:
        _save(path, _pixels(rng, 8 + i, 10), "JPEG")
  # As in the real DTD, a stray desktop file the converter skips.
  with open(os.path.join(root, "images", "waffled", ".directory"), "w") as f:
    f.write("[Dolphin]\nTimestamp=2013,1,1\n")
  _write_json(os.path.join(splits, "dtd_splits.json"),
              {"train": ["zigzagged", "banded"], "valid": ["waffled"],
               "test": ["cracked"]})


def vgg_flower(root, rng, splits):
  labels = [2, 1, 3, 2, 1, 2]  # class of image_00001.jpg, image_00002.jpg...
  for i in range(len(labels)):
    _save(os.path.join(root, "jpg", f"image_{i + 1:05d}.jpg"),
          _pixels(rng, 10, 8), "JPEG")
  scipy.io.savemat(os.path.join(root, "imagelabels.mat"),
                   {"labels": np.array([labels], dtype=np.uint8)})
  _write_json(os.path.join(splits, "vgg_flower_splits.json"),
              {"train": ["002.hard-leaved pocket orchid"],
               "valid": ["003.canterbury bells"],
               "test": ["001.pink primrose"]})


def aircraft(root, rng, splits):
  data = os.path.join(root, "data")
  variants = {"1042": "A300B4", "0917": "F/A-18", "2001": "747-400",
              "1999": "A300B4", "0003": "747-400", "0588": "F/A-18",
              "1500": "A300B4"}
  boxes = []
  for name in sorted(variants):
    _save(os.path.join(data, "images", name + ".jpg"), _pixels(rng, 14, 18),
          "JPEG")
    x0, y0 = rng.integers(0, 5, size=2)
    boxes.append(f"{name} {x0} {y0} {x0 + rng.integers(6, 13)} "
                 f"{y0 + rng.integers(5, 9)}")
  with open(os.path.join(data, "images_box.txt"), "w") as f:
    f.write("\n".join(boxes) + "\n")
  names = sorted(variants)
  with open(os.path.join(data, "images_variant_trainval.txt"), "w") as f:
    f.writelines(f"{n} {variants[n]}\n" for n in names[:4])
  with open(os.path.join(data, "images_variant_test.txt"), "w") as f:
    f.writelines(f"{n} {variants[n]}\n" for n in names[4:])
  with open(os.path.join(data, "variants.txt"), "w") as f:
    f.write("747-400\nA300B4\nF/A-18\n")
  _write_json(os.path.join(splits, "aircraft_splits.json"),
              {"train": ["F/A-18", "747-400"], "valid": [],
               "test": ["A300B4"]})


def cu_birds(root, rng, splits):
  classes = ("001.Black_footed_Albatross", "002.Laysan_Albatross",
             "003.Sooty_Albatross")
  with open(os.path.join(_mkdir(root), "classes.txt"), "w") as f:
    f.writelines(f"{i + 1} {c}\n" for i, c in enumerate(classes))
  for k, name in enumerate(classes):
    for i in range(2 + k % 2):
      stem = name.split(".")[1]
      _save(os.path.join(root, "images", name, f"{stem}_{i:04d}_{k}.jpg"),
            _pixels(rng, 9, 12), "JPEG")
  _write_json(os.path.join(splits, "cu_birds_splits.json"),
              {"train": ["003.Sooty_Albatross"],
               "valid": ["001.Black_footed_Albatross"],
               "test": ["002.Laysan_Albatross"]})


def traffic_sign(root, rng, splits):
  for k in range(2):
    folder = os.path.join(root, "Final_Training", "Images", f"{k:05d}")
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for track in range(2):
      for frame in range(3):
        name = f"{track:05d}_{frame:05d}.ppm"
        _save(os.path.join(folder, name), _pixels(rng, 7, 8), "PPM")
        rows.append(f"{name};8;7;1;1;6;5;{k}")
    with open(os.path.join(folder, f"GT-{k:05d}.csv"), "w") as f:
      f.write("\n".join(rows) + "\n")
  _write_json(os.path.join(splits, "traffic_sign_splits.json"),
              {"train": [], "valid": [],
               "test": ["00.Speed limit (20km/h)",
                        "01.Speed limit (30km/h)"]})


def fungi(root, rng, splits):
  categories = [{"id": 0, "name": "Amanita muscaria", "supercategory": "F"},
                {"id": 1, "name": "Boletus edulis", "supercategory": "F"},
                {"id": 2, "name": "Boletus edulis", "supercategory": "F"}]
  sets = {"train": [], "val": []}
  image_id = 1000
  for cat in (2, 0, 1, 0, 2, 2, 1):
    for part in ("train", "val"):
      if (image_id + cat) % 3 == 0 and part == "val":
        continue
      name = f"images/{cat:04d}_x/{part}_{image_id}.JPG"
      _save(os.path.join(root, name), _pixels(rng, 8, 9), "JPEG")
      sets[part].append((image_id, name, cat))
      image_id += 1
  for part, items in sets.items():
    _write_json(os.path.join(root, f"{part}.json"), {
        "categories": categories,
        "images": [{"id": i, "file_name": n, "width": 9, "height": 8}
                   for i, n, _ in items],
        "annotations": [{"id": i, "image_id": i, "category_id": c}
                        for i, _, c in items][::-1],
    })
  _write_json(os.path.join(splits, "fungi_splits.json"),
              {"train": ["0002.Boletus edulis"],
               "valid": ["0000.Amanita muscaria"],
               "test": ["0001.Boletus edulis"]})


def quickdraw(root, rng, splits):
  _mkdir(root)
  for k, name in enumerate(("apple", "The Eiffel Tower", "zigzag")):
    if k == 2:  # 0/1 arrays are scaled to 0/255 by the converter
      imgs = rng.uniform(size=(2, 784)) < 0.3
    else:
      imgs = (_pixels(rng, 28 * (2 + k), 28, channels=1)
              .reshape(2 + k, 784))
    np.save(os.path.join(root, name + ".npy"), imgs)
  _write_json(os.path.join(splits, "quickdraw_splits.json"),
              {"train": ["zigzag", "apple"], "valid": ["The Eiffel Tower"],
               "test": []})


def mscoco(root, rng, splits):
  # 80 categories with COCO-style, non-contiguous ids; only 3 are used.
  categories = [{"supercategory": "s", "id": i + 1 + i // 10,
                 "name": f"thing{i:02d}"} for i in range(80)]
  used = {"thing03": 4, "thing11": 13, "thing42": 47}
  images = {}
  for image_id, (h, w) in ((9, (20, 24)), (25, (18, 16)), (139, (22, 20))):
    path = os.path.join(root, "train2017", f"{image_id:012d}.jpg")
    grey = image_id == 25
    _save(path, _pixels(rng, h, w, channels=1 if grey else 3), "JPEG")
    images[image_id] = (h, w)
  annotations = [
      # Past the right edge of the 24-px-wide image: an empty crop, dropped
      # (and thing03 is listed in images_per_class after thing11).
      (9, 4, [30.0, 2.0, 2.0, 3.0]),
      (9, 13, [2.5, 3.25, 10.0, 8.5]),
      (139, 4, [0.0, 0.0, 6.4, 7.9]),
      (25, 13, [5.0, 4.0, 14.0, 20.0]),  # grows past the border: clipped
      (9, 47, [1.7, 10.2, 3.3, 4.4]),
      (139, 13, [19.6, 3.0, 4.0, 5.0]),  # clipped to 1 pixel wide
      (25, 4, [7.5, 7.5, 0.6, 0.6]),
      (9, 4, [12.0, 2.0, 11.0, 15.0]),
  ]
  _write_json(os.path.join(root, "instances_train2017.json"), {
      "images": [{"id": i, "height": h, "width": w,
                  "file_name": f"{i:012d}.jpg"}
                 for i, (h, w) in images.items()],
      "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": b,
                       "area": b[2] * b[3], "iscrowd": 0}
                      for n, (i, c, b) in enumerate(annotations)],
      "categories": categories,
  })
  assert all(any(c["name"] == k and c["id"] == v for c in categories)
             for k, v in used.items())
  _write_json(os.path.join(splits, "mscoco_splits.json"),
              {"train": [], "valid": ["thing42", "thing03"],
               "test": ["thing11"]})


def ilsvrc_2012(root, rng):
  """Images of 4 of the 1000 classes; `materialize_ilsvrc` adds the rest."""
  classes = {
      "n01440764": 3,  # train (tench)
      "n01531178": 2,  # train; holds a CUB duplicate, which is skipped
      "n02085620": 2,  # valid (Chihuahua, below "carnivore")
      "n02666196": 2,  # test (abacus, below "device")
  }
  for wn_id, num in classes.items():
    for i in range(num):
      _save(os.path.join(root, wn_id, f"{wn_id}_{10 + i}.JPEG"),
            _pixels(rng, 9 + i, 12), "JPEG")
  # Listed in ImageNet_CUBirds_duplicates.txt: left out of counts and records.
  _save(os.path.join(root, "n01531178", "n01531178_12730.JPEG"),
        _pixels(rng, 8, 8), "JPEG")
  # Re-encoded: greyscale JPEG; PNG bytes under a .JPEG name (as some
  # real ILSVRC files); CMYK JPEG.
  _save(os.path.join(root, "n01440764", "n01440764_20.JPEG"),
        _pixels(rng, 10, 10, channels=1), "JPEG")
  _save(os.path.join(root, "n02085620", "n02085620_20.JPEG"),
        _pixels(rng, 10, 11), "PNG")
  _save(os.path.join(root, "n02666196", "n02666196_20.JPEG"),
        _pixels(rng, 11, 10), "JPEG", mode="CMYK")
  # Unreadable: counted (its name ends in JPEG) but skipped when writing.
  with open(os.path.join(root, "n02666196", "n02666196_30.JPEG"), "wb") as f:
    f.write(b"not an image")


def materialize_ilsvrc(committed, dest):
  """The whole raw ILSVRC-2012 tree the converters read, in `dest`.

  The committed images plus an empty folder for each other class, and
  `words.txt` / `wordnet.is_a.txt` (which only the official converter
  reads) holding the official sampling DAG: the nodes and edges of the
  official ilsvrc_2012_v2 spec, from md-convert's package data (taken from
  the official specs), plus two extra synsets (below). Git keeps no empty
  folders, hence this step.
  """
  # Here, not at the top: only this step needs the package installed.
  # pylint: disable-next=g-import-not-at-top
  from meta_dataset_pipeline.conversion import ilsvrc
  with gzip.open(os.path.join(ilsvrc._DATA,  # pylint: disable=protected-access
                              "ilsvrc_2012_splits.json.gz")) as f:
    graph = json.load(f)["ilsvrc_2012_v2"]["TRAIN"]
  shutil.copytree(committed, dest)
  words = {w: text for w, text, _ in graph}
  edges = [(w, c) for w, _, children in sorted(graph) for c in children]
  # Two nodes of the official DAG keep a single child: in WordNet they
  # reach it along two paths, and the official collapse of single-child
  # nodes leaves the child listed twice. An extra synset on a second path
  # reproduces that (and is itself collapsed away).
  for k, (w, _, children) in enumerate(sorted(graph)):
    if len(children) == 1:
      extra = f"n9999999{k % 10}"
      assert extra not in words
      words[extra] = f"second path from {w} to {children[0]}"
      edges += [(w, extra), (extra, children[0])]
  with open(os.path.join(dest, "words.txt"), "w") as f:
    f.writelines(f"{w}\t{words[w]}\n" for w in sorted(words))
  with open(os.path.join(dest, "wordnet.is_a.txt"), "w") as f:
    f.writelines(f"{p} {c}\n" for p, c in sorted(edges))
  for wn_id, _, children in graph:
    if not children:
      os.makedirs(os.path.join(dest, wn_id), exist_ok=True)


def _mkdir(path):
  os.makedirs(path, exist_ok=True)
  return path


SOURCES = {"omniglot": omniglot, "dtd": dtd, "vgg_flower": vgg_flower,
           "aircraft": aircraft, "cu_birds": cu_birds,
           "traffic_sign": traffic_sign, "fungi": fungi,
           "quickdraw": quickdraw, "mscoco": mscoco,
           "ilsvrc_2012": ilsvrc_2012}


def main():
  if sys.argv[1:2] == ["--materialize_ilsvrc"]:
    materialize_ilsvrc(os.path.join(HERE, "raw", "ilsvrc_2012"), sys.argv[2])
    return
  raw = os.path.join(HERE, "raw")
  splits = os.path.join(HERE, "splits")
  only = sys.argv[1:]
  for k, (name, make) in enumerate(SOURCES.items()):
    if only and name not in only:
      continue
    if os.path.exists(os.path.join(raw, name)):
      sys.exit(f"{raw}/{name} exists; remove it first to regenerate")
    rng = np.random.default_rng(1000 + k)
    if name in ("omniglot", "ilsvrc_2012"):
      make(os.path.join(raw, name), rng)
    else:
      make(os.path.join(raw, name), rng, splits)


if __name__ == "__main__":
  main()
