"""Pieces shared by the per-source planners: plans, images, splits."""

import dataclasses
import io
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from meta_dataset_pipeline import records_writer

# Seed the official converter gives numpy before drawing a split.
SPLIT_SEED = 22
SPLIT_KEYS = ("train", "valid", "test")


class ConversionError(Exception):
  """Bad raw input; the message is one line naming what is missing."""


@dataclasses.dataclass(frozen=True)
class ClassJob:
  """One class file to write.

  `images_fn(*args)` yields the class's encoded images in record order; it
  must be a module-level function so the job can be sent to a worker.
  `expected` is the number of images it should yield, when known in advance
  (progress only).
  """
  class_id: int
  name: str
  images_fn: Callable[..., Iterator[bytes]]
  args: tuple
  expected: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """A source's conversion: its class jobs and how to build its spec.

  `spec_fn(counts, path)` returns the spec dict given the number of records
  written for every class id and the records folder. `prepare_fn(path)`, if
  any, runs on the records folder before any class is written.
  """
  name: str
  jobs: Sequence[ClassJob]
  spec_fn: Callable[[Mapping[int, int], str], dict]
  prepare_fn: Callable[[str], None] | None = None


def require_dir(path: str, what: str) -> str:
  """Returns `path` if it is a folder, else raises naming `what`."""
  if not os.path.isdir(path):
    raise ConversionError(f"expected {what} at {path} (no such folder)")
  return path


def require_file(path: str, what: str) -> str:
  """Returns `path` if it is a file, else raises naming `what`."""
  if not os.path.isfile(path):
    raise ConversionError(f"expected {what} at {path} (no such file)")
  return path


def read_json(path: str, what: str) -> Any:
  """Loads a JSON file that must exist and parse."""
  require_file(path, what)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ConversionError(f"{what} at {path} is not valid JSON: {e}") from None


def sorted_listdir(path: str) -> list[str]:
  """Entry names of a folder, sorted (the official converter's order)."""
  return sorted(os.listdir(path))


def directory_files(folder: str, skip=()) -> list[str]:
  """Sorted paths of the files (not folders) in `folder`, minus `skip`."""
  return [os.path.join(folder, n) for n in sorted_listdir(folder)
          if n not in skip and not os.path.isdir(os.path.join(folder, n))]


def to_jpeg(img: Image.Image) -> bytes:
  """Pillow's JPEG at its defaults (quality 75, 4:2:0), as the official."""
  buf = io.BytesIO()
  img.save(buf, format="JPEG")
  return buf.getvalue()


def image_record(path: str, bbox=None, invert: bool = False) -> bytes:
  """The record bytes of one image file, with the official rules.

  The file's bytes are stored unchanged when Pillow reads it as an RGB JPEG
  and nothing is to be done to it; otherwise it is converted to RGB, cropped
  to `bbox` (left, top, right, bottom), inverted, and re-encoded as JPEG,
  in that order.

  Args:
    path: the image file.
    bbox: optional crop box, in PIL's convention.
    invert: whether to invert the colours (Omniglot).

  Returns:
    The encoded image.

  Raises:
    ConversionError: the file cannot be read or decoded.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    img = Image.open(io.BytesIO(data))
    changed = img.format != "JPEG"
    if img.mode != "RGB":
      img = img.convert("RGB")
      changed = True
    if bbox is not None:
      img = img.crop(tuple(bbox))
      changed = True
    if invert:
      img = ImageOps.invert(img)
      changed = True
    return to_jpeg(img) if changed else data
  except OSError as e:
    raise ConversionError(f"cannot read image {path}: {e}") from None


def images_from_files(paths: Sequence[str], bboxes=None,
                      invert: bool = False) -> Iterator[bytes]:
  """Yields `image_record` of every path, in order (a `ClassJob` fn)."""
  for i, path in enumerate(paths):
    yield image_record(path, None if bboxes is None else bboxes[i], invert)


def random_split_indices(num_train: int, num_valid: int, num_test: int,
                         seed: int = SPLIT_SEED):
  """Class indices of each split, drawn as the official converter draws.

  The official code seeds numpy's global generator with 22 and draws the
  train+valid classes, then the train classes among them, without
  replacement; the valid and test indices come out sorted, train in draw
  order. A `RandomState` seeded alike gives the same stream.

  Args:
    num_train: number of train classes.
    num_valid: number of valid classes.
    num_test: number of test classes.
    seed: the seed.

  Returns:
    Three lists of ints: train, valid and test indices.
  """
  rng = np.random.RandomState(seed)
  num_classes = num_train + num_valid + num_test
  trainval = rng.choice(num_classes, num_train + num_valid, replace=False)
  test = np.setdiff1d(np.arange(num_classes), trainval)
  train = rng.choice(trainval, num_train, replace=False)
  valid = np.setdiff1d(trainval, train)
  return train.tolist(), valid.tolist(), test.tolist()


def index_splits(names: Sequence[str], counts: Sequence[int],
                 what: str) -> dict:
  """The official random split of the class list `names`.

  Args:
    names: all class names, in the order the official converter lists them.
    counts: number of train, valid and test classes.
    what: what `names` are, for the error message.

  Returns:
    {"train": [...], "valid": [...], "test": [...]} of names.
  """
  if len(names) != sum(counts):
    raise ConversionError(
        f"expected {sum(counts)} {what}, found {len(names)}")
  train, valid, test = random_split_indices(*counts)
  return {"train": [names[i] for i in train],
          "valid": [names[i] for i in valid],
          "test": [names[i] for i in test]}


def load_or_make_splits(splits_root: str, name: str,
                        make_fn: Callable[[], dict]) -> dict:
  """The source's class splits: read from the split file, or made and saved.

  As the official converter: an existing `<splits_root>/<name>_splits.json`
  that parses is used as it is; otherwise `make_fn()` draws the splits and
  they are written there (2-space JSON), replacing a file that did not
  parse.

  Args:
    splits_root: the folder of split files.
    name: the source name.
    make_fn: returns {"train": [...], "valid": [...], "test": [...]}.

  Returns:
    The splits dict.
  """
  path = os.path.join(splits_root, f"{name}_splits.json")
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        splits = json.load(f)
    except ValueError:
      splits = None
    if splits:
      missing = [k for k in SPLIT_KEYS if k not in splits]
      if missing:
        raise ConversionError(
            f"split file {path} lacks the keys {missing} (expected "
            f"{list(SPLIT_KEYS)})")
      return splits
  splits = make_fn()
  os.makedirs(splits_root, exist_ok=True)
  with records_writer.atomic_output_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(splits, f, indent=2)
  return splits


def flat_spec_fn(name: str, splits: Mapping[str, Sequence[str]]):
  """A `Plan.spec_fn` for a flat source whose ids follow `splits`."""
  names = split_class_names(splits)
  per_split = {k.upper(): len(splits[k]) for k in SPLIT_KEYS}
  return _FlatSpec(name, per_split, tuple(names))


@dataclasses.dataclass(frozen=True)
class _FlatSpec:
  """Picklable spec builder of `flat_spec_fn`."""
  name: str
  classes_per_split: Mapping[str, int]
  class_names: tuple

  def __call__(self, counts: Mapping[int, int], path: str) -> dict:
    return records_writer.dataset_spec_dict(
        self.name, self.classes_per_split,
        [counts[i] for i in range(len(self.class_names))],
        self.class_names, path)


def split_class_names(splits: Mapping[str, Sequence[str]]) -> list[str]:
  """All class names, train then valid then test: the class id order."""
  return [c for k in SPLIT_KEYS for c in splits[k]]
