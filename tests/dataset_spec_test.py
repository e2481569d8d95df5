"""Loading and validation of the official dataset specifications."""

import json
import os
import shutil

import pytest

from meta_dataset_pipeline import dataset_spec as spec_lib
import meta_dataset_pipeline as mdp

# (type, TRAIN, VALID, TEST classes, total images) of the canonical specs.
EXPECTED = {
    "aircraft": ("DatasetSpecification", 70, 15, 15, 10000),
    "cu_birds": ("DatasetSpecification", 140, 30, 30, 11788),
    "dtd": ("DatasetSpecification", 33, 7, 7, 5640),
    "fungi": ("DatasetSpecification", 994, 200, 200, 89760),
    "ilsvrc_2012": ("HierarchicalDatasetSpecification", 712, 158, 130,
                    1280764),
    "ilsvrc_2012_v2": ("HierarchicalDatasetSpecification", 1000, 0, 0,
                       1280764),
    "mscoco": ("DatasetSpecification", 0, 40, 40, 860001),
    "omniglot": ("BiLevelDatasetSpecification", 883, 81, 659, 32460),
    "quickdraw": ("DatasetSpecification", 241, 52, 52, 50426266),
    "traffic_sign": ("DatasetSpecification", 0, 0, 43, 39209),
    "vgg_flower": ("DatasetSpecification", 71, 15, 16, 8189),
}


def _specs_dir(shared_dir):
  return shared_dir / "fixtures" / "official_specs" / "dataset_specs"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_every_official_spec(shared_dir, name):
  path = _specs_dir(shared_dir) / f"{name}_dataset_spec.json"
  spec = mdp.load_dataset_spec(path)
  kind, train, valid, test, images = EXPECTED[name]
  assert type(spec).__name__ == kind
  assert spec.name == name
  assert spec.path == str(path.parent)  # Replaced, as upstream does.
  counts = [train, valid, test]
  assert [spec.classes_per_split[s] for s in mdp.Split] == counts
  # Contiguous ranges: train, then valid, then test.
  assert spec.get_classes(mdp.Split.TRAIN) == range(0, train)
  assert spec.get_classes("valid") == range(train, train + valid)
  assert spec.get_classes("TEST") == range(train + valid, sum(counts))
  assert sum(spec.images_per_class.values()) == images
  raw = json.loads(path.read_text())
  if kind != "HierarchicalDatasetSpecification":
    assert spec.get_total_images_per_class(5) == int(
        raw["images_per_class"]["5"])


def test_omniglot_superclasses(shared_dir):
  spec = mdp.load_dataset_spec(
      _specs_dir(shared_dir) / "omniglot_dataset_spec.json")
  assert spec.get_superclasses(mdp.Split.TRAIN) == range(0, 25)
  assert spec.get_superclasses(mdp.Split.TEST) == range(30, 50)
  # Superclass 30 is the first test alphabet: its classes start the test
  # range; relative ids count from the split start.
  rel, absolute = spec.get_class_ids_from_superclass_subclass_inds(
      mdp.Split.TEST, 30, [0, 2])
  start = spec.get_classes(mdp.Split.TEST).start
  assert absolute == [start, start + 2] and rel == [0, 2]
  assert spec.superclass_offsets[-1] == 1623


def test_ilsvrc_dag(shared_dir):
  specs_dir = _specs_dir(shared_dir)
  spec = mdp.load_dataset_spec(specs_dir / "ilsvrc_2012_dataset_spec.json")
  leaf_counts = json.loads(
      (specs_dir / "ilsvrc_2012_num_leaf_images.json").read_text())
  raw = json.loads((specs_dir / "ilsvrc_2012_dataset_spec.json").read_text())
  roots = {"TRAIN": "n00001740", "VALID": "n02075296", "TEST": "n03183080"}
  for split in mdp.Split:
    graph = spec.get_split_subgraph(split)
    assert len(graph.nodes) == len(raw["split_subgraphs"][split.name])
    top = [n for n, node in graph.nodes.items() if not node.parents]
    assert top == [roots[split.name]]
    # The root spans every leaf of the split, and its image count is theirs.
    assert graph.spanning_leaves[top[0]] == frozenset(graph.leaves)
    assert spec.images_per_node[split][top[0]] == sum(
        leaf_counts[l] for l in graph.leaves)
    ids = sorted(spec.class_names_to_ids[l] for l in graph.leaves)
    assert ids == list(spec.get_classes(split))
  # Per-class counts equal the converter's num_leaf_images.
  for class_id, count in spec.images_per_class.items():
    assert leaf_counts[spec.class_names[class_id]] == count


def test_fixture_records_dirs(shared_dir):
  records = shared_dir / "fixtures" / "md_records"
  omniglot = mdp.load_dataset_spec(records / "omniglot")
  dtd = mdp.load_dataset_spec(str(records / "dtd"))
  assert isinstance(omniglot, mdp.BiLevelDatasetSpecification)
  assert omniglot.path == str(records / "omniglot")
  assert [omniglot.classes_per_split[s] for s in mdp.Split] == [160, 32, 136]
  assert set(omniglot.images_per_class.values()) == {20}
  assert dtd.class_file(3) == os.path.join(str(records / "dtd"),
                                           "3.tfrecords")
  assert sum(dtd.images_per_class[c] for c in dtd.get_classes("TRAIN")) == (
      1045)


def _write(tmp_path, dct, name="dataset_spec.json"):
  path = tmp_path / name
  path.write_text(json.dumps(dct))
  return path


def _dtd(shared_dir):
  return json.loads(
      (_specs_dir(shared_dir) / "dtd_dataset_spec.json").read_text())


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.pop("classes_per_split"), "classes_per_split"),
    (lambda d: d["classes_per_split"].pop("VALID"), "classes_per_split.VALID"),
    (lambda d: d["classes_per_split"].update(TRAIN="many"),
     "classes_per_split.TRAIN"),
    (lambda d: d["images_per_class"].update({"3": -1}), "images_per_class.3"),
    (lambda d: d["images_per_class"].pop("7"), "images_per_class"),
    (lambda d: d.update(file_pattern="{}.rec"), "file_pattern"),
    (lambda d: d.update(__class__="Nope"), "__class__"),
    (lambda d: d.pop("name"), "name"),
    (lambda d: d["class_names"].update({"x": "y"}), "class_names.x"),
    (lambda d: d["classes_per_split"].update(TRAIN=34), "images_per_class"),
])
def test_malformed_flat_spec_names_file_and_key(shared_dir, tmp_path, edit,
                                                key):
  dct = _dtd(shared_dir)
  edit(dct)
  path = _write(tmp_path, dct)
  with pytest.raises(mdp.SpecError) as err:
    mdp.load_dataset_spec(tmp_path)
  assert str(path) in str(err.value)
  assert f"'{key}'" in str(err.value)


def test_malformed_bilevel_and_hierarchical(shared_dir, tmp_path):
  specs_dir = _specs_dir(shared_dir)
  omni = json.loads((specs_dir / "omniglot_dataset_spec.json").read_text())
  omni["superclasses_per_split"]["TEST"] = 21
  _write(tmp_path, omni)
  with pytest.raises(mdp.SpecError, match="'classes_per_superclass'"):
    mdp.load_dataset_spec(tmp_path)

  ilsvrc = json.loads((specs_dir / "ilsvrc_2012_dataset_spec.json")
                      .read_text())
  ilsvrc["images_per_class"]["TEST"]["n03183080"] += 1
  _write(tmp_path, ilsvrc)
  with pytest.raises(mdp.SpecError,
                     match=r"'images_per_class\.TEST\.n03183080'.*sum"):
    mdp.load_dataset_spec(tmp_path)

  ilsvrc["images_per_class"]["TEST"]["n03183080"] -= 1
  ilsvrc["split_subgraphs"]["VALID"][0]["children_ids"].append("n99999999")
  _write(tmp_path, ilsvrc)
  with pytest.raises(mdp.SpecError, match="n99999999 is not in the graph"):
    mdp.load_dataset_spec(tmp_path)


def test_num_leaf_images_cross_check(shared_dir, tmp_path):
  specs_dir = _specs_dir(shared_dir)
  shutil.copy(specs_dir / "ilsvrc_2012_dataset_spec.json",
              tmp_path / "dataset_spec.json")
  counts = json.loads(
      (specs_dir / "ilsvrc_2012_num_leaf_images.json").read_text())
  counts["n01440764"] += 5
  (tmp_path / "num_leaf_images.json").write_text(json.dumps(counts))
  with pytest.raises(mdp.SpecError, match="n01440764.*num_leaf_images"):
    mdp.load_dataset_spec(tmp_path)


def test_missing_and_invalid_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset_spec.json"):
    mdp.load_dataset_spec(tmp_path / "nowhere")
  (tmp_path / "dataset_spec.json").write_text("{not json")
  with pytest.raises(mdp.SpecError, match="not valid JSON"):
    mdp.load_dataset_spec(tmp_path)


def test_split_names_and_pools(shared_dir):
  spec = mdp.load_dataset_spec(_specs_dir(shared_dir) /
                               "aircraft_dataset_spec.json")
  with pytest.raises(ValueError, match="invalid split"):
    spec.get_classes("training")
  with pytest.raises(NotImplementedError):
    spec.get_total_images_per_class(0, pool="train")
  assert spec_lib.has_dag_ontology(spec) is False
