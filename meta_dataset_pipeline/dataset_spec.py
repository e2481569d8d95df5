"""Meta-Dataset dataset specifications: loading, validation and split ranges.

A converted Meta-Dataset source is a folder with one TFRecord file per class
and a `dataset_spec.json` describing it. The JSON is the `to_dict()` of one of
three official specification classes (see `meta_dataset/data/dataset_spec.py`
upstream); this module reads all three into frozen dataclasses that keep the
official field names and query methods:

- `DatasetSpecification` (flat sources such as dtd, aircraft, fungi):
  `classes_per_split` gives the number of classes of each split.
- `BiLevelDatasetSpecification` (omniglot): splits are made of superclasses
  (alphabets); `superclasses_per_split` and `classes_per_superclass` define
  them, and a split's classes are those of its superclasses.
- `HierarchicalDatasetSpecification` (ilsvrc_2012): each split has its own
  WordNet sub-DAG (`split_subgraphs`); a split's classes are the leaves of its
  DAG, and `images_per_class[split]` counts, for every node of that DAG, the
  images of the leaves it spans. Nodes are keyed by WordNet id here (the
  official code uses `Synset` objects), and `class_names` maps class id to
  WordNet id.

Split semantics are the official ones: absolute class ids are contiguous,
train classes first, then valid, then test, so `get_classes(split)` is a
`range`. Relative class ids (what the episode sampler reports) are offsets
into that range.

The official loader builds the ILSVRC DAG from the spec JSON alone (the
`*_num_leaf_images.json` files are inputs of the converter, which computes
`images_per_class` from them). `load_dataset_spec` does the same, and can also
cross-check the leaf counts against a `num_leaf_images` file when one is given
or sits next to the spec (`num_leaf_images.json`, as the converter writes it).

Unlike the official loader, which trusts its input, every spec is validated on
load; a malformed spec raises `SpecError` naming the file and the key.
"""

import dataclasses
import enum
import functools
import json
import os
from typing import Any, Mapping, Sequence

from meta_dataset_pipeline import files

SPEC_FILENAME = "dataset_spec.json"
# The converter writes this next to ILSVRC records (official default name).
NUM_LEAF_IMAGES_FILENAME = "num_leaf_images.json"
# Only one file per class is supported, as in the official reader.
SUPPORTED_FILE_PATTERNS = ("{}.tfrecords",)
OFFICIAL_FILE_PATTERNS = ("{}.tfrecords", "{}_{}.tfrecords")


class Split(enum.Enum):
  """Meta-splits of a source; names and values as the official enum."""
  TRAIN = 0
  VALID = 1
  TEST = 2


class SpecError(ValueError):
  """A dataset specification that is missing, malformed or inconsistent."""


def _split_offsets(counts: Mapping[Split, int]) -> dict[Split, int]:
  """Start of each split in the contiguous train/valid/test id range."""
  return {Split.TRAIN: 0,
          Split.VALID: counts[Split.TRAIN],
          Split.TEST: counts[Split.TRAIN] + counts[Split.VALID]}


def as_split(split) -> Split:
  """Accepts a `Split` or its name ("train", "TRAIN")."""
  if isinstance(split, Split):
    return split
  try:
    return Split[str(split).upper()]
  except KeyError:
    raise ValueError(f"invalid split {split!r}; expected one of "
                     f"{[s.name for s in Split]}") from None


class _FlatMixin:
  """Queries shared by every spec type (needs `classes_per_split`)."""

  def get_classes(self, split) -> range:
    """Absolute class ids of `split`, contiguous and in order."""
    split = as_split(split)
    offset = _split_offsets(self.classes_per_split)[split]
    return range(offset, offset + self.classes_per_split[split])

  def get_total_images_per_class(self, class_id: int, pool=None) -> int:
    """Number of images (records) of absolute class `class_id`."""
    if pool is not None:
      raise NotImplementedError(
          "example-level splits (pools) are not supported, as upstream")
    try:
      return self.images_per_class[class_id]
    except KeyError:
      raise ValueError(f"{self.name}: no class with id {class_id}") from None

  @property
  def num_classes(self) -> int:
    return sum(self.classes_per_split.values())

  def class_file(self, class_id: int) -> str:
    """Path of the TFRecord file of absolute class `class_id`."""
    return files.join(self.path, self.file_pattern.format(class_id))


@dataclasses.dataclass(frozen=True)
class DatasetSpecification(_FlatMixin):
  """A source without class hierarchy (official `DatasetSpecification`)."""
  name: str
  classes_per_split: Mapping[Split, int]
  images_per_class: Mapping[int, int]
  class_names: Mapping[int, str]
  path: str
  file_pattern: str


@dataclasses.dataclass(frozen=True)
class BiLevelDatasetSpecification(_FlatMixin):
  """Superclass/class source such as Omniglot (official bi-level spec)."""
  name: str
  superclasses_per_split: Mapping[Split, int]
  classes_per_superclass: Mapping[int, int]
  images_per_class: Mapping[int, int]
  superclass_names: Mapping[int, str]
  class_names: Mapping[int, str]
  path: str
  file_pattern: str

  def get_superclasses(self, split) -> range:
    """Superclass ids of `split` (contiguous, train first)."""
    split = as_split(split)
    offset = _split_offsets(self.superclasses_per_split)[split]
    return range(offset, offset + self.superclasses_per_split[split])

  @functools.cached_property
  def superclass_offsets(self) -> tuple[int, ...]:
    """Absolute id of the first class of each superclass (and the total)."""
    offsets = [0]
    for i in range(len(self.classes_per_superclass)):
      offsets.append(offsets[-1] + self.classes_per_superclass[i])
    return tuple(offsets)

  @functools.cached_property
  def classes_per_split(self) -> dict[Split, int]:
    return {s: sum(self.classes_per_superclass[i]
                   for i in self.get_superclasses(s)) for s in Split}

  def get_class_ids_from_superclass_subclass_inds(
      self, split, superclass_id: int, class_inds: Sequence[int]):
    """(relative, absolute) class ids of classes `class_inds` of a superclass.

    Args:
      split: the split the superclass belongs to.
      superclass_id: absolute superclass id.
      class_inds: indices of classes within the superclass.

    Returns:
      Two lists: ids relative to the split, and absolute ids.
    """
    start = self.superclass_offsets[superclass_id]
    abs_ids = [start + int(i) for i in class_inds]
    offset = self.get_classes(split).start
    return [c - offset for c in abs_ids], abs_ids


@dataclasses.dataclass(frozen=True)
class Synset:
  """One node of the WordNet DAG; links are WordNet ids."""
  wn_id: str
  words: str
  children: tuple[str, ...]
  parents: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SynsetGraph:
  """A split's DAG (official `split_subgraphs[split]`), keyed by WordNet id."""
  nodes: Mapping[str, Synset]

  @functools.cached_property
  def leaves(self) -> tuple[str, ...]:
    """WordNet ids of nodes without children, sorted."""
    return tuple(sorted(k for k, n in self.nodes.items() if not n.children))

  @functools.cached_property
  def spanning_leaves(self) -> dict[str, frozenset[str]]:
    """Maps every node to the leaves reachable from it (a leaf: itself)."""
    memo: dict[str, frozenset[str]] = {}
    # Iterative post-order, as the WordNet DAG is deep enough to make
    # recursion fragile; a node is final once all its children are.
    for root in sorted(self.nodes):
      stack = [root]
      while stack:
        wn_id = stack[-1]
        if wn_id in memo:
          stack.pop()
          continue
        pending = [c for c in self.nodes[wn_id].children if c not in memo]
        if pending:
          stack.extend(pending)
          continue
        stack.pop()
        children = self.nodes[wn_id].children
        memo[wn_id] = (frozenset().union(*(memo[c] for c in children))
                       if children else frozenset([wn_id]))
    return memo

  @property
  def internal_nodes(self) -> tuple[str, ...]:
    return tuple(sorted(k for k, n in self.nodes.items() if n.children))


@dataclasses.dataclass(frozen=True)
class HierarchicalDatasetSpecification(_FlatMixin):
  """ILSVRC-style source whose splits are WordNet sub-DAGs."""
  name: str
  split_subgraphs: Mapping[Split, SynsetGraph]
  # Per split: images spanned by every node of that split's DAG.
  images_per_node: Mapping[Split, Mapping[str, int]]
  class_names: Mapping[int, str]
  path: str
  file_pattern: str

  @functools.cached_property
  def class_names_to_ids(self) -> dict[str, int]:
    return {v: k for k, v in self.class_names.items()}

  @functools.cached_property
  def classes_per_split(self) -> dict[Split, int]:
    return {s: len(self.split_subgraphs[s].leaves) for s in Split}

  @functools.cached_property
  def images_per_class(self) -> dict[int, int]:
    """Images of each class (leaf), by absolute class id."""
    out = {}
    for s in Split:
      for leaf in self.split_subgraphs[s].leaves:
        out[self.class_names_to_ids[leaf]] = self.images_per_node[s][leaf]
    return out

  def get_split_subgraph(self, split) -> SynsetGraph:
    return self.split_subgraphs[as_split(split)]


AnySpec = (DatasetSpecification | BiLevelDatasetSpecification
           | HierarchicalDatasetSpecification)


class _Reader:
  """Typed access to a JSON dict with errors naming the file and key."""

  def __init__(self, filename: str):
    self.filename = filename

  def fail(self, key: str, what: str):
    raise SpecError(f"{self.filename}: key '{key}': {what}")

  def get(self, dct: Mapping[str, Any], key: str, kind, where: str = ""):
    full = f"{where}.{key}" if where else key
    if not isinstance(dct, Mapping):
      self.fail(where or "<root>", f"expected an object, got {dct!r:.60}")
    if key not in dct:
      self.fail(full, "missing")
    value = dct[key]
    if not isinstance(value, kind) or isinstance(value, bool):
      self.fail(full, f"expected {getattr(kind, '__name__', kind)}, got "
                f"{type(value).__name__} {value!r:.60}")
    return value

  def count(self, value, key: str) -> int:
    """A non-negative int, also accepting the JSON-string form."""
    try:
      out = int(value)
    except (TypeError, ValueError):
      self.fail(key, f"expected a non-negative integer, got {value!r:.60}")
    if out < 0 or isinstance(value, (bool, float)):
      self.fail(key, f"expected a non-negative integer, got {value!r:.60}")
    return out

  def int_keyed(self, dct, key: str, convert) -> dict[int, Any]:
    """An object with integer keys 0..n-1 (JSON stores them as strings)."""
    raw = self.get(dct, key, dict)
    out = {}
    for k, v in raw.items():
      try:
        ik = int(k)
      except ValueError:
        self.fail(f"{key}.{k}", "keys must be integer ids")
      out[ik] = convert(v, f"{key}.{k}")
    if sorted(out) != list(range(len(out))):
      missing = sorted(set(range(max(out, default=-1) + 1)) - set(out))
      self.fail(key, f"ids must be contiguous from 0; missing {missing[:5]}")
    return out

  def splits(self, dct, key: str) -> dict[Split, int]:
    raw = self.get(dct, key, dict)
    extra = set(raw) - {s.name for s in Split}
    if extra:
      self.fail(key, f"unknown splits {sorted(extra)}")
    return {s: self.count(self.get(raw, s.name, (int, str), key),
                          f"{key}.{s.name}") for s in Split}

  def name(self, value, key: str) -> str:
    if not isinstance(value, str):
      self.fail(key, f"expected a string, got {value!r:.60}")
    return value


def _common(r: _Reader, dct, path: str) -> dict[str, Any]:
  pattern = r.get(dct, "file_pattern", str)
  if pattern not in OFFICIAL_FILE_PATTERNS:
    r.fail("file_pattern", f"{pattern!r} is not one of "
           f"{OFFICIAL_FILE_PATTERNS}")
  return dict(name=r.get(dct, "name", str), path=path, file_pattern=pattern,
              class_names=r.int_keyed(dct, "class_names", r.name))


def _check_counts_cover(r: _Reader, images_per_class, num_classes: int,
                        what: str):
  if len(images_per_class) != num_classes:
    r.fail("images_per_class", f"has {len(images_per_class)} classes but "
           f"{what} defines {num_classes}")


def _flat(r: _Reader, dct, path: str) -> DatasetSpecification:
  common = _common(r, dct, path)
  per_split = r.splits(dct, "classes_per_split")
  images = r.int_keyed(dct, "images_per_class", r.count)
  _check_counts_cover(r, images, sum(per_split.values()), "classes_per_split")
  if len(common["class_names"]) != len(images):
    r.fail("class_names", f"has {len(common['class_names'])} entries, "
           f"images_per_class has {len(images)}")
  return DatasetSpecification(classes_per_split=per_split,
                              images_per_class=images, **common)


def _bilevel(r: _Reader, dct, path: str) -> BiLevelDatasetSpecification:
  common = _common(r, dct, path)
  per_split = r.splits(dct, "superclasses_per_split")
  per_super = r.int_keyed(dct, "classes_per_superclass", r.count)
  if len(per_super) != sum(per_split.values()):
    r.fail("classes_per_superclass", f"has {len(per_super)} superclasses, "
           f"superclasses_per_split sums to {sum(per_split.values())}")
  images = r.int_keyed(dct, "images_per_class", r.count)
  _check_counts_cover(r, images, sum(per_super.values()),
                      "classes_per_superclass")
  names = r.int_keyed(dct, "superclass_names", r.name)
  if len(names) != len(per_super):
    r.fail("superclass_names", f"has {len(names)} entries for "
           f"{len(per_super)} superclasses")
  return BiLevelDatasetSpecification(
      superclasses_per_split=per_split, classes_per_superclass=per_super,
      images_per_class=images, superclass_names=names, **common)


def _graph(r: _Reader, nodes_json, key: str) -> SynsetGraph:
  if not isinstance(nodes_json, list):
    r.fail(key, "expected a list of nodes")
  nodes = {}
  for i, node in enumerate(nodes_json):
    where = f"{key}[{i}]"
    wn_id = r.get(node, "wn_id", str, where)
    if wn_id in nodes:
      r.fail(where, f"duplicate WordNet id {wn_id}")
    nodes[wn_id] = Synset(
        wn_id=wn_id, words=r.get(node, "words", str, where),
        children=tuple(r.get(node, "children_ids", list, where)),
        parents=tuple(r.get(node, "parents_ids", list, where)))
  for wn_id, node in nodes.items():
    for link, back in (("children", "parents"), ("parents", "children")):
      for other in getattr(node, link):
        if other not in nodes:
          r.fail(f"{key}.{wn_id}", f"{link} id {other} is not in the graph")
        if wn_id not in getattr(nodes[other], back):
          r.fail(f"{key}.{wn_id}", f"{link} link to {other} is one-sided")
  return SynsetGraph(nodes)


def _hierarchical(r: _Reader, dct, path: str,
                  num_leaf_images: Mapping[str, int] | None
                  ) -> HierarchicalDatasetSpecification:
  common = _common(r, dct, path)
  raw_graphs = r.get(dct, "split_subgraphs", dict)
  raw_counts = r.get(dct, "images_per_class", dict)
  graphs, counts, seen = {}, {}, set()
  for s in Split:
    graph = _graph(r, r.get(raw_graphs, s.name, list, "split_subgraphs"),
                   f"split_subgraphs.{s.name}")
    # A WordNet id lives in at most one split DAG (official invariant).
    dup = seen & set(graph.nodes)
    if dup:
      r.fail(f"split_subgraphs.{s.name}",
             f"WordNet ids also in another split: {sorted(dup)[:3]}")
    seen |= set(graph.nodes)
    split_counts = r.get(raw_counts, s.name, dict, "images_per_class")
    node_counts = {}
    for wn_id in graph.nodes:
      if wn_id not in split_counts:
        r.fail(f"images_per_class.{s.name}.{wn_id}", "missing")
      node_counts[wn_id] = r.count(split_counts[wn_id],
                                   f"images_per_class.{s.name}.{wn_id}")
    # Internal counts must be the sum over spanned leaves (the converter's
    # definition); a mismatch means the file was edited inconsistently.
    for wn_id, leaves in graph.spanning_leaves.items():
      total = sum(node_counts[l] for l in leaves)
      if node_counts[wn_id] != total:
        r.fail(f"images_per_class.{s.name}.{wn_id}",
               f"{node_counts[wn_id]} != {total}, the sum over its leaves")
    graphs[s], counts[s] = graph, node_counts
  spec = HierarchicalDatasetSpecification(
      split_subgraphs=graphs, images_per_node=counts, **common)
  ids = spec.class_names_to_ids
  if len(ids) != len(spec.class_names):
    r.fail("class_names", "WordNet ids are not unique")
  offset = 0
  for s in Split:
    leaves = graphs[s].leaves
    unknown = [l for l in leaves if l not in ids]
    if unknown:
      r.fail(f"split_subgraphs.{s.name}",
             f"leaves without a class id in class_names: {unknown[:3]}")
    got = sorted(ids[l] for l in leaves)
    if got != list(range(offset, offset + len(leaves))):
      r.fail("class_names", f"{s.name} leaves must have the contiguous ids "
             f"{offset}..{offset + len(leaves) - 1}")
    offset += len(leaves)
  if offset != len(ids):
    r.fail("class_names", f"{len(ids) - offset} classes are in no split")
  if num_leaf_images is not None:
    for wn_id, count in spec.images_per_class.items():
      wn_id = spec.class_names[wn_id]
      if num_leaf_images.get(wn_id) != count:
        r.fail(f"images_per_class.*.{wn_id}",
               f"{count} images, but the num_leaf_images file says "
               f"{num_leaf_images.get(wn_id)}")
  return spec


def _read_json(filename: str):
  try:
    return json.loads(files.read_text(filename))
  except json.JSONDecodeError as e:
    raise SpecError(f"{filename}: not valid JSON ({e})") from None


def load_dataset_spec(path, num_leaf_images_path=None) -> AnySpec:
  """Loads the specification of one converted source.

  As upstream, the spec's `path` is replaced by the folder the spec is loaded
  from, which is where the class record files are looked up.

  Args:
    path: a records folder holding `dataset_spec.json`, or a spec JSON file
      (e.g. an official `<name>_dataset_spec.json`).
    num_leaf_images_path: optional JSON mapping WordNet id to image count; the
      leaf counts of a hierarchical spec are checked against it. By default
      `num_leaf_images.json` next to the spec is used if present.

  Returns:
    A `DatasetSpecification`, `BiLevelDatasetSpecification` or
    `HierarchicalDatasetSpecification`.

  Raises:
    FileNotFoundError: no spec at `path`.
    SpecError: the spec is malformed (the message names file and key).
  """
  path = os.fspath(path)
  if files.isdir(path):
    filename = files.join(path, SPEC_FILENAME)
    folder = path
  else:
    filename, folder = path, files.dirname(path)
  if not files.isfile(filename):
    raise FileNotFoundError(
        f"no dataset spec: {filename} does not exist (expected a records "
        f"folder holding {SPEC_FILENAME}, or a spec file)")
  dct = _read_json(filename)
  r = _Reader(filename)
  kind = r.get(dct, "__class__", str)
  if kind == "DatasetSpecification":
    return _flat(r, dct, folder)
  if kind == "BiLevelDatasetSpecification":
    return _bilevel(r, dct, folder)
  if kind == "HierarchicalDatasetSpecification":
    leaf_file = num_leaf_images_path
    if leaf_file is None:
      # Records folders hold `num_leaf_images.json`; the official canonical
      # specs sit next to `<name>_num_leaf_images.json`.
      base = os.path.basename(filename)
      candidates = [files.join(folder, NUM_LEAF_IMAGES_FILENAME)]
      if base.endswith("_" + SPEC_FILENAME):
        candidates.append(files.join(folder, base[:-len(SPEC_FILENAME)]
                                       + NUM_LEAF_IMAGES_FILENAME))
      leaf_file = next((c for c in candidates if files.isfile(c)), None)
    leaf_counts = None
    if leaf_file is not None:
      leaf_counts = _read_json(os.fspath(leaf_file))
      if not isinstance(leaf_counts, dict):
        raise SpecError(f"{leaf_file}: expected an object wn_id -> count")
    return _hierarchical(r, dct, folder, leaf_counts)
  r.fail("__class__", f"unknown specification class {kind!r}")


def has_dag_ontology(spec: AnySpec) -> bool:
  return isinstance(spec, HierarchicalDatasetSpecification)


def has_bilevel_ontology(spec: AnySpec) -> bool:
  return isinstance(spec, BiLevelDatasetSpecification)


def spec_from_dict(dct, path: str, where: str) -> AnySpec:
  """A spec from its JSON object, e.g. the `dataset_specs` metadata of a
  TFDS-prepared source (`tfds_source.py`).

  Args:
    dct: the spec's `to_dict()` JSON object.
    path: the spec's `path` (where its data is).
    where: names the object in errors, like a file name.

  Returns:
    A spec, validated as by `load_dataset_spec` (no leaf-count file).

  Raises:
    SpecError: the object is malformed (naming `where` and the key).
  """
  r = _Reader(where)
  kind = r.get(dct, "__class__", str)
  build = {"DatasetSpecification": _flat,
           "BiLevelDatasetSpecification": _bilevel}.get(kind)
  if build is not None:
    return build(r, dct, path)
  if kind == "HierarchicalDatasetSpecification":
    return _hierarchical(r, dct, path, None)
  r.fail("__class__", f"unknown specification class {kind!r}")
