"""`md-convert --verify`: check a records folder against its spec.

Every problem is listed, not just the first: a missing or unreadable spec,
missing class files, record counts that differ from the spec, truncated
files, CRC mismatches, records that are not two-feature Examples, labels
that are not the file's class id, images that do not decode, files a
killed conversion left behind, and sidecar record indexes
(`<class_id>.tfrecords.index`) that do not describe their class file.
"""

import concurrent.futures
import io
import multiprocessing
import os
import re

from PIL import Image

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import record_files
from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline.conversion import records

_CLASS_FILE = re.compile(r"^(\d+)\.tfrecords$")


def _image_problem(image: bytes) -> str | None:
  try:
    with Image.open(io.BytesIO(image)) as img:
      img.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return f"image does not decode ({e})"
  return None


def check_class_file(path: str, class_id: int) -> tuple[int, list[str]]:
  """Reads every record of one class file.

  Args:
    path: the class's TFRecord file.
    class_id: the id its labels must hold.

  Returns:
    The number of records read, and the problems found (each starting with
    the record index).
  """
  problems, count = [], 0

  def bad_data(problem):
    nonlocal count
    count += 1
    problems.append(str(problem))

  try:
    for payload in records.iter_records(path, bad_data):
      index = count
      count += 1
      try:
        features = records.parse_example(payload)
      except records.RecordProblem as e:
        problems.append(f"record {index}: not a tf.train.Example ({e})")
        continue
      if sorted(features) != ["image", "label"]:
        problems.append(f"record {index}: features {sorted(features)}, "
                        f"expected ['image', 'label']")
        continue
      if features["label"] != [class_id]:
        problems.append(f"record {index}: label {features['label']}, "
                        f"expected [{class_id}]")
      if len(features["image"]) != 1:
        problems.append(f"record {index}: {len(features['image'])} images")
        continue
      problem = _image_problem(features["image"][0])
      if problem:
        problems.append(f"record {index}: {problem}")
  except records.RecordProblem as e:
    problems.append(str(e))
  return count, problems


def _index_problems(path: str, count: int) -> list[str]:
  """What is wrong with the sidecar index of `path`, if it has one."""
  index_path = record_files.index_file_path(path)
  if not os.path.isfile(index_path):
    return []
  with open(index_path, "rb") as f:
    data = f.read()
  try:
    offsets = record_files.decode_record_index(data, os.path.getsize(path))
  except ValueError as e:
    return [f"{index_path}: unusable record index ({e}); rewrite it with "
            f"md-index {os.path.dirname(path) or '.'}"]
  if len(offsets) - 1 != count:
    return [f"{index_path}: lists {len(offsets) - 1} records, the file "
            f"holds {count}; rewrite it with md-index --force "
            f"{os.path.dirname(path) or '.'}"]
  return []


def verify(records_dir: str, workers: int = 1) -> list[str]:
  """All problems of a records folder (empty if it matches its spec).

  Args:
    records_dir: a converted source: `dataset_spec.json` and the class
      files.
    workers: processes reading class files (decoding every image is the
      slow part).

  Returns:
    One line per problem, naming the file, in class order.
  """
  try:
    spec = spec_lib.load_dataset_spec(records_dir)
  except (spec_lib.SpecError, OSError, ValueError) as e:
    return [f"{records_dir}: cannot load the dataset spec: {e}"]
  problems = []
  paths = [os.path.join(records_dir, spec.file_pattern.format(c))
           for c in range(spec.num_classes)]
  present = [c for c, p in enumerate(paths) if os.path.isfile(p)]
  if workers > 1 and len(present) > 1:
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn")) as pool:
      checked = dict(zip(present, pool.map(
          check_class_file, [paths[c] for c in present], present,
          chunksize=max(1, len(present) // (8 * workers)))))
  else:
    checked = {c: check_class_file(paths[c], c) for c in present}
  for class_id, path in enumerate(paths):
    try:
      expected = spec.get_total_images_per_class(class_id)
    except (ValueError, KeyError):
      problems.append(f"{path}: the spec lists no image count for class "
                      f"{class_id}")
      expected = None
    if class_id not in checked:
      problems.append(f"{path}: missing (class {class_id})")
      continue
    count, file_problems = checked[class_id]
    problems.extend(f"{path}: {p}" for p in file_problems)
    if expected is not None and count != expected:
      problems.append(f"{path}: {count} records, the spec lists {expected}")
    problems.extend(_index_problems(path, count))
  for name in sorted(os.listdir(records_dir)):
    path = os.path.join(records_dir, name)
    if name.startswith(records_writer.TMP_PREFIX):
      problems.append(f"{path}: temporary file of an interrupted conversion")
      continue
    match = _CLASS_FILE.match(name)
    if match and int(match.group(1)) >= spec.num_classes:
      # The official MSCOCO converter leaves empty files for unused ids.
      if os.path.getsize(path):
        problems.append(f"{path}: records of class {match.group(1)}, which "
                        f"the spec does not have")
  return problems
