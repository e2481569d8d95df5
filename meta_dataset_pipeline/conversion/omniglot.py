"""Omniglot: alphabets (superclasses) of characters (classes).

Raw layout (the official README's download, both zips unpacked):

    <data_root>/images_background/<alphabet>/<character>/*.png   30 alphabets
    <data_root>/images_evaluation/<alphabet>/<character>/*.png   20 alphabets

Splits come from the folders: the background alphabets minus five held out
for validation are the train superclasses (sorted), then the five
validation alphabets in the official order, then the evaluation alphabets
(sorted) for test. Characters are sorted within an alphabet, images within
a character; every image is converted to RGB, inverted (white strokes on
black) and stored as JPEG. Writes no split file.
"""

import os

from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline.conversion import common

VALID_ALPHABETS = (
    "Blackfoot_(Canadian_Aboriginal_Syllabics)",
    "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)",
    "Tagalog",
    "Alphabet_of_the_Magi",
)
NUM_BACKGROUND = 30
NUM_EVALUATION = 20


class _Spec:
  """Builds the bi-level spec once the image counts are known."""

  def __init__(self, superclasses_per_split, classes_per_superclass,
               superclass_names, class_names):
    self.args = (superclasses_per_split, classes_per_superclass,
                 superclass_names, class_names)

  def __call__(self, counts, path):
    per_split, per_superclass, superclass_names, class_names = self.args
    return records_writer.bilevel_dataset_spec_dict(
        "omniglot", per_split, per_superclass,
        [counts[i] for i in range(len(class_names))], superclass_names,
        class_names, path)


def plan(data_root: str, splits_root: str) -> common.Plan:
  """Plans the conversion of an Omniglot download."""
  del splits_root  # Omniglot's splits are fixed by its folders.
  background = common.require_dir(
      os.path.join(data_root, "images_background"),
      "Omniglot's images_background folder (images_background.zip unpacked)")
  evaluation = common.require_dir(
      os.path.join(data_root, "images_evaluation"),
      "Omniglot's images_evaluation folder (images_evaluation.zip unpacked)")
  bg_alphabets = common.sorted_listdir(background)
  missing = [a for a in VALID_ALPHABETS if a not in bg_alphabets]
  if missing or len(bg_alphabets) != NUM_BACKGROUND:
    raise common.ConversionError(
        f"expected {NUM_BACKGROUND} alphabet folders in {background} "
        f"including {', '.join(VALID_ALPHABETS)}; found "
        f"{len(bg_alphabets)}" + (f", missing {missing}" if missing else ""))
  test_alphabets = common.sorted_listdir(evaluation)
  if len(test_alphabets) != NUM_EVALUATION:
    raise common.ConversionError(
        f"expected {NUM_EVALUATION} alphabet folders in {evaluation}; found "
        f"{len(test_alphabets)}")
  train_alphabets = [a for a in bg_alphabets if a not in VALID_ALPHABETS]
  groups = (("TRAIN", train_alphabets, background),
            ("VALID", VALID_ALPHABETS, background),
            ("TEST", test_alphabets, evaluation))

  jobs, per_split, per_superclass, superclass_names, class_names = (
      [], {}, [], [], [])
  for split, alphabets, root in groups:
    per_split[split] = len(alphabets)
    for alphabet in alphabets:
      alphabet_dir = os.path.join(root, alphabet)
      characters = common.sorted_listdir(alphabet_dir)
      superclass_names.append(alphabet)
      per_superclass.append(len(characters))
      for character in characters:
        files = common.directory_files(os.path.join(alphabet_dir, character))
        class_names.append(f"{alphabet}-{character}")
        jobs.append(common.ClassJob(
            len(jobs), class_names[-1], common.images_from_files,
            (files, None, True), len(files)))
  return common.Plan("omniglot", jobs, _Spec(
      per_split, per_superclass, superclass_names, class_names))
