"""ILSVRC-2012: the 1000 training-set synsets, split along WordNet.

Raw layout: `<data_root>/<wn_id>/*.JPEG`, one folder per ILSVRC-2012 class
(ILSVRC2012_img_train.tar and its 1000 inner tars unpacked).

The official converter builds the WordNet DAG of the 1000 classes from
`words.txt` and `wordnet.is_a.txt`, collapses single-child nodes, and cuts
it into train / valid ("carnivore") / test ("device") sub-DAGs (ilsvrc_2012)
or keeps it whole for training (ilsvrc_2012_v2). That construction depends
on WordNet only, not on the images, so md-convert takes the resulting
sub-DAGs from the official dataset specs (`data/ilsvrc_2012_splits.json.gz`,
see `data/README.md`) and needs no WordNet files.

Counts and records, as the official converter:
- `num_leaf_images.json` in the records folder caches, per class, the
  number of files whose name ends in "jpeg" (any case), minus the images
  that duplicate Caltech-101/256 or CUB images (`data/
  ilsvrc_2012_duplicates.txt`); an existing file is used as it is.
  `images_per_class` of every node of a split's DAG is the sum over the
  classes below it.
- Class ids: each split's classes sorted by WordNet id, train, valid, test.
  A class's records are its sorted files minus those duplicates, stored as
  they are when RGB JPEGs, else re-encoded; unreadable files are skipped.
"""

import gzip
import json
import os
import sys

from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline.conversion import common

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
NUM_LEAF_IMAGES_FILENAME = "num_leaf_images.json"
SPLITS = records_writer.SPLITS


def _load_graphs(name: str) -> dict:
  """{split: [(wn_id, words, children ids)]} of the official spec `name`."""
  with gzip.open(os.path.join(_DATA, "ilsvrc_2012_splits.json.gz")) as f:
    return json.load(f)[name]


def duplicate_files() -> frozenset:
  """Base names of the ILSVRC images that other sources also hold."""
  with open(os.path.join(_DATA, "ilsvrc_2012_duplicates.txt"),
            encoding="utf-8") as f:
    return frozenset(line.strip() for line in f if line.strip())


def _leaves(graph) -> list[str]:
  return sorted(wn_id for wn_id, _, children in graph if not children)


def images_from_synset(folder: str, skip: frozenset):
  """Yields a class's records; unreadable images are skipped, as upstream."""
  for path in common.directory_files(folder, skip):
    try:
      yield common.image_record(path)
    except common.ConversionError as e:
      print(f"md-convert: skipping {path}: {e}", file=sys.stderr)


def count_leaf_images(folder: str, skip: frozenset) -> int:
  """Files of a class named *.jpeg (any case), minus the duplicates."""
  return len({n for n in os.listdir(folder) if n.lower().endswith("jpeg")}
             - skip)


class _Spec:
  """Builds the hierarchical spec; `prepare` sets the leaf counts."""

  def __init__(self, name, data_root, graphs, class_names, skip):
    self.name = name
    self.data_root = data_root
    self.graphs = graphs
    self.class_names = class_names
    self.skip = skip
    self.leaf_counts = None

  def prepare(self, records_dir: str):
    """Reads `num_leaf_images.json`, or counts and writes it."""
    path = os.path.join(records_dir, NUM_LEAF_IMAGES_FILENAME)
    if os.path.isfile(path):
      self.leaf_counts = common.read_json(path, "the image counts cache")
      missing = [c for c in self.class_names if c not in self.leaf_counts]
      if missing:
        raise common.ConversionError(
            f"{path} lacks the count of {missing[0]}; delete it to recount")
      return
    self.leaf_counts = {
        wn_id: count_leaf_images(os.path.join(self.data_root, wn_id),
                                 self.skip)
        for wn_id in sorted(self.class_names)}
    with records_writer.atomic_output_path(path) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(self.leaf_counts, f, indent=2)

  def __call__(self, counts, path):
    del counts  # The official spec counts from num_leaf_images.json.
    subgraphs, images = {}, {}
    for split in SPLITS:
      graph = self.graphs[split]
      children = {wn_id: c for wn_id, _, c in graph}
      parents = {wn_id: [] for wn_id, _, _ in graph}
      for wn_id, _, c in graph:
        for child in c:
          parents[child].append(wn_id)
      subgraphs[split] = [
          {"wn_id": wn_id, "words": words, "children_ids": sorted(c),
           "parents_ids": sorted(parents[wn_id])}
          for wn_id, words, c in sorted(graph)]
      below = {}

      def leaves_below(wn_id):
        if wn_id not in below:
          kids = children[wn_id]
          below[wn_id] = ({wn_id} if not kids else
                          set().union(*(leaves_below(k) for k in kids)))
        return below[wn_id]

      images[split] = {
          wn_id: sum(self.leaf_counts[leaf] for leaf in leaves_below(wn_id))
          for wn_id, _, _ in sorted(graph)}
    return {
        "name": self.name,
        "split_subgraphs": subgraphs,
        "images_per_class": images,
        "class_names": {str(i): n for i, n in enumerate(self.class_names)},
        "path": path,
        "file_pattern": records_writer.FILE_PATTERN,
        "__class__": "HierarchicalDatasetSpecification",
    }


def plan(data_root: str, splits_root: str,
         name: str = "ilsvrc_2012") -> common.Plan:
  """Plans the conversion of the ILSVRC-2012 training set."""
  del splits_root  # The splits are the WordNet sub-DAGs.
  common.require_dir(data_root, "the ILSVRC-2012 training images")
  graphs = _load_graphs(name)
  class_names = [c for s in SPLITS for c in _leaves(graphs[s])]
  folders = {e for e in os.listdir(data_root)
             if os.path.isdir(os.path.join(data_root, e))}
  missing = sorted(set(class_names) - folders)
  extra = sorted(folders - set(class_names))
  if missing or extra:
    raise common.ConversionError(
        f"expected one folder per ILSVRC-2012 class (n01440764, ...) in "
        f"{data_root}: " + (f"{len(missing)} missing, e.g. "
                            f"{os.path.join(data_root, missing[0])}"
                            if missing else "") +
        ("; " if missing and extra else "") +
        (f"{len(extra)} unexpected, e.g. {extra[0]}" if extra else ""))
  skip = duplicate_files()
  jobs = []
  for class_id, wn_id in enumerate(class_names):
    folder = os.path.join(data_root, wn_id)
    jobs.append(common.ClassJob(class_id, wn_id, images_from_synset,
                                (folder, skip), count_leaf_images(folder,
                                                                  skip)))
  spec = _Spec(name, data_root, graphs, class_names, skip)
  return common.Plan(name, jobs, spec, prepare_fn=spec.prepare)


def plan_v2(data_root: str, splits_root: str) -> common.Plan:
  """ILSVRC-2012 with every class in the train split (ilsvrc_2012_v2)."""
  return plan(data_root, splits_root, name="ilsvrc_2012_v2")
