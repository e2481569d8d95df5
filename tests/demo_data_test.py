"""Tests of the embedded demo dataset and the Meta-Dataset record writer."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from ctx_jax.demo import dataset as demo_dataset
from ctx_jax.demo import glyphs
from ctx_jax.demo import render
from ctx_jax.eval import baselines
from meta_dataset_pipeline import records_writer

# 9 classes -> 6 train, 1 valid, 2 test (16% and 20%, at least 1 each).
TINY = glyphs.DemoConfig(num_classes=9, images_per_class=4, image_size=32,
                            seed=0)
TINY_ARGS = ["--num_classes", "9", "--images_per_class", "4",
             "--image_size", "32", "--seed", "0"]
OFFICIAL_KEYS = ["name", "classes_per_split", "images_per_class",
                 "class_names", "path", "file_pattern", "__class__"]


def _read_dir(path):
  """{file name: bytes} of a folder."""
  return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def _parse_class_file(path):
  """Records of one class file: list of (decoded image, label, keys)."""
  features = {"image": tf.io.FixedLenFeature([], tf.string),
              "label": tf.io.FixedLenFeature([], tf.int64)}
  out = []
  for record in tf.data.TFRecordDataset(str(path)):
    keys = set(tf.train.Example.FromString(
        record.numpy()).features.feature.keys())
    ex = tf.io.parse_single_example(record, features)
    image = tf.io.decode_image(ex["image"], channels=3).numpy()
    out.append((image, int(ex["label"]), keys, ex["image"].numpy()))
  return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("records") / "glyphs"
  demo_dataset.generate_dataset(str(out), TINY)
  return out


def _err(e, capsys):
  """A user error: exit status 1 and one `error:` line on stderr."""
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("ctx-make-demo-data: error: ") and err.count("\n") == 1
  return err


def test_tiny_dataset_records(tiny_dir):
  assert sorted(os.listdir(tiny_dir)) == sorted(
      [f"{i}.tfrecords" for i in range(9)] + ["dataset_spec.json"])
  for class_id in range(9):
    records = _parse_class_file(tiny_dir / f"{class_id}.tfrecords")
    assert len(records) == 4
    for image, label, keys, encoded in records:
      assert keys == {"image", "label"}
      assert label == class_id
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8
      assert encoded[:2] == b"\xff\xd8"  # JPEG, as the official records.
      # Not blank: the glyph, background and noise all vary.
      assert image.std() > 5


def test_tiny_dataset_spec(tiny_dir):
  text = (tiny_dir / "dataset_spec.json").read_text()
  spec = json.loads(text)
  # Byte layout of the official converter: json.dump(indent=2), no newline.
  assert text == json.dumps(spec, indent=2)
  assert list(spec) == OFFICIAL_KEYS
  assert spec["name"] == "glyphs"
  assert spec["classes_per_split"] == {"TRAIN": 6, "VALID": 1, "TEST": 2}
  assert list(spec["classes_per_split"]) == ["TRAIN", "VALID", "TEST"]
  assert spec["images_per_class"] == {str(i): 4 for i in range(9)}
  assert spec["class_names"] == {
      str(i): f"glyph_{i:04d}" for i in range(9)}
  assert spec["path"] == str(tiny_dir)
  assert spec["file_pattern"] == "{}.tfrecords"
  assert spec["__class__"] == "DatasetSpecification"


def test_spec_matches_official_fixture_layout(tiny_dir, shared_dir):
  official_path = (shared_dir / "fixtures" / "md_records" / "dtd" /
                   "dataset_spec.json")
  official = json.loads(official_path.read_text())
  ours = json.loads((tiny_dir / "dataset_spec.json").read_text())
  assert list(ours) == list(official)
  for key in official:
    assert type(ours[key]) is type(official[key]), key
  assert list(ours["classes_per_split"]) == list(
      official["classes_per_split"])
  for key in ("images_per_class", "class_names"):
    assert all(isinstance(k, str) for k in ours[key])
    assert type(next(iter(ours[key].values()))) is type(
        next(iter(official[key].values())))


def test_record_bytes_parse_like_official_fixture(shared_dir):
  # A record we serialize from an official record's content parses to the
  # same features (the official files use either map order).
  path = shared_dir / "fixtures" / "md_records" / "omniglot" / "0.tfrecords"
  raw = next(iter(tf.data.TFRecordDataset(str(path)))).numpy()
  ex = tf.train.Example.FromString(raw)
  image = ex.features.feature["image"].bytes_list.value[0]
  label = ex.features.feature["label"].int64_list.value[0]
  ours = records_writer.serialize_example(image, label)
  assert tf.train.Example.FromString(ours) == ex
  # The official omniglot record happens to use the sorted order.
  assert ours == raw


@pytest.mark.parametrize("label", [0, 1, 127, 128, 300, 2**40])
def test_serialize_example_matches_tensorflow(label):
  rng = np.random.default_rng(label % 1000)
  for size in (0, 1, 7, 8, 9, 200, 70000):
    image = rng.bytes(size)
    example = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label])),
    }))
    assert records_writer.serialize_example(image, label) == (
        example.SerializeToString(deterministic=True))


def test_record_file_matches_tfrecordwriter(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.bytes(n) for n in (0, 1, 5, 13, 1000, 65537)]
  assert records_writer.write_class_records(str(tmp_path), 3, images) == 6
  with tf.io.TFRecordWriter(str(tmp_path / "ref")) as writer:
    for image in images:
      writer.write(records_writer.serialize_example(image, 3))
  assert (tmp_path / "3.tfrecords").read_bytes() == (
      tmp_path / "ref").read_bytes()
  assert records_writer.crc32c(b"123456789") == 0xE3069283


def test_splits_disjoint_and_contiguous(tiny_dir):
  spec = json.loads((tiny_dir / "dataset_spec.json").read_text())
  ids, first = {}, 0
  for split in ("TRAIN", "VALID", "TEST"):
    n = spec["classes_per_split"][split]
    ids[split] = set(range(first, first + n))
    first += n
  assert first == 9
  assert not ids["TRAIN"] & ids["VALID"]
  assert not ids["TRAIN"] & ids["TEST"]
  assert not ids["VALID"] & ids["TEST"]
  # Every class has its own glyph program (no class is reused in another
  # split under another id).
  programs = [glyphs.class_glyph(TINY, c) for c in range(9)]
  flat = [np.concatenate([s.points.ravel() for s in g]) for g in programs]
  for i in range(9):
    for j in range(i + 1, 9):
      assert flat[i].shape != flat[j].shape or not np.allclose(
          flat[i], flat[j])
  # Families never straddle splits.
  for c in range(9):
    start = glyphs.family_start(TINY, c)
    split_of = [s for s in ids if c in ids[s]][0]
    assert start in ids[split_of]


def test_deterministic_byte_identical(tmp_path, monkeypatch):
  # Same relative --output_dir from two working directories: every file,
  # dataset_spec.json included (its `path` is stored as given), is equal.
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path / sub)
    assert demo_dataset.main(["--output_dir", "glyphs"] + TINY_ARGS) == 0
  first = _read_dir(tmp_path / "a" / "glyphs")
  assert first == _read_dir(tmp_path / "b" / "glyphs")
  # A different seed changes the images.
  monkeypatch.chdir(tmp_path)
  demo_dataset.generate_dataset(
      "other", glyphs.DemoConfig(num_classes=9, images_per_class=4,
                                    image_size=32, seed=1))
  other = _read_dir(tmp_path / "other")
  assert other["0.tfrecords"] != first["0.tfrecords"]


def test_instances_do_not_depend_on_count():
  few = render.render_class(TINY, 3, num_images=2)
  many = render.render_class(TINY, 3, num_images=4)
  np.testing.assert_array_equal(few[0], many[0])
  np.testing.assert_array_equal(few[1], many[1])


def test_png_format(tmp_path):
  cfg = glyphs.DemoConfig(num_classes=3, images_per_class=2,
                             image_size=16, image_format="png")
  demo_dataset.generate_dataset(str(tmp_path / "p"), cfg)
  (image, label, _, encoded), _ = _parse_class_file(tmp_path / "p" /
                                                     "2.tfrecords")
  assert encoded[:4] == b"\x89PNG" and label == 2
  assert image.shape == (16, 16, 3)


def test_refuses_non_empty_dir_without_overwrite(tmp_path, capsys):
  out = tmp_path / "glyphs"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(SystemExit) as e:
    demo_dataset.main(["--output_dir", str(out)] + TINY_ARGS)
  err = _err(e, capsys)
  assert str(out) in err and "not empty" in err
  assert os.listdir(out) == ["keep.txt"]
  assert (out / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["glyphs"]  # No leftovers.
  capsys.readouterr()


def test_overwrite_replaces_only_a_generated_dataset(tmp_path, capsys):
  out = tmp_path / "glyphs"
  demo_dataset.main(["--output_dir", str(out)] + TINY_ARGS)
  before = _read_dir(out)
  # Without --overwrite: error, old dataset untouched.
  with pytest.raises(SystemExit) as e:
    demo_dataset.main(["--output_dir", str(out), "--seed", "1"] + TINY_ARGS[:6])
  err = _err(e, capsys)
  assert str(out) in err
  assert _read_dir(out) == before
  # With --overwrite: replaced.
  assert demo_dataset.main(["--output_dir", str(out), "--overwrite", "--seed",
                         "1"] + TINY_ARGS[:6]) == 0
  after = _read_dir(out)
  assert after.keys() == before.keys() and after != before
  # A folder with a foreign file is never deleted, even with --overwrite.
  (out / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    demo_dataset.main(["--output_dir", str(out), "--overwrite"] + TINY_ARGS)
  err = _err(e, capsys)
  assert str(out) in err and "notes.txt" in err
  assert (out / "notes.txt").read_text() == "mine"
  assert {k: v for k, v in _read_dir(out).items()
          if k != "notes.txt"} == after
  assert sorted(os.listdir(tmp_path)) == ["glyphs"]


def test_unwritable_output(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  out = blocker / "glyphs"
  with pytest.raises(SystemExit) as e:
    demo_dataset.main(["--output_dir", str(out)] + TINY_ARGS)
  err = _err(e, capsys)
  assert str(out) in err
  assert blocker.read_text() == "x"
  with pytest.raises(SystemExit) as e:
    demo_dataset.main(["--output_dir", str(blocker)] + TINY_ARGS)
  err = _err(e, capsys)
  assert str(blocker) in err
  assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_parent(tmp_path, capsys):
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o555)
  try:
    with pytest.raises(SystemExit) as e:
      demo_dataset.main(["--output_dir", str(parent / "glyphs")] + TINY_ARGS)
    err = _err(e, capsys)
    assert str(parent / "glyphs") in err
  finally:
    parent.chmod(0o755)


def test_interrupted_run_keeps_old_dataset(tmp_path, monkeypatch):
  out = tmp_path / "glyphs"
  demo_dataset.generate_dataset(str(out), TINY)
  before = _read_dir(out)
  real_write = records_writer.write_class_records

  def failing_write(records_dir, class_id, images):
    if class_id == 4:
      raise KeyboardInterrupt
    return real_write(records_dir, class_id, images)

  monkeypatch.setattr(records_writer, "write_class_records", failing_write)
  with pytest.raises(KeyboardInterrupt):
    demo_dataset.generate_dataset(str(out), TINY, overwrite=True)
  assert _read_dir(out) == before
  with pytest.raises(KeyboardInterrupt):
    demo_dataset.generate_dataset(str(tmp_path / "new"), TINY)
  # No partial dataset, no staging folder left behind.
  assert sorted(os.listdir(tmp_path)) == ["glyphs"]


def test_atomic_output_path_keeps_old_file_on_error(tmp_path):
  path = tmp_path / "f.json"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with records_writer.atomic_output_path(str(path)) as tmp:
      pathlib.Path(tmp).write_text("half")
      raise RuntimeError
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["f.json"]


def test_bad_config_exits(capsys):
  with pytest.raises(SystemExit) as e:
    demo_dataset.main(["--output_dir", "unused", "--num_classes", "2"])
  err = _err(e, capsys)
  assert "num_classes" in err or "2 classes" in err
  assert not os.path.exists("unused")


def _episode(support, s_labels, query, q_labels, pad=2):
  """A numpy episode with `pad` padding rows (mask False) on each set."""
  def padded(x, value):
    return np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)])
  return {"support_images": padded(support, 9.0),
          "support_labels": padded(s_labels, 0),
          "support_mask": padded(np.ones(len(support), bool), False),
          "query_images": padded(query, -9.0),
          "query_labels": padded(q_labels, 1),
          "query_mask": padded(np.ones(len(query), bool), False)}


def test_baselines_classify_real_rows_only():
  rng = np.random.default_rng(0)
  support = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
  s_labels = np.array([0, 0, 1, 1, 2, 2])
  # Queries: small perturbations of support images 0, 3, 5.
  query = support[[0, 3, 5]] + 0.01
  q_labels = np.array([0, 1, 2])
  ep = _episode(support, s_labels, query, q_labels)
  assert baselines.nearest_neighbour(ep)["accuracy"] == 1.0
  assert baselines.pixel_nearest_neighbour(ep)["accuracy"] == 1.0
  # Wrong labels on the queries: accuracy 0 (padding never counted).
  wrong = _episode(support, s_labels, query, (q_labels + 1) % 3)
  assert baselines.nearest_neighbour(wrong)["accuracy"] == 0.0
  # Class means: queries at the means of classes 2, 0.
  means = support.reshape(3, 2, -1).mean(1).reshape(3, 4, 4, 3)
  ep = _episode(support, s_labels, means[[2, 0]], np.array([2, 0]))
  assert baselines.nearest_class_mean(ep)["accuracy"] == 1.0
  # Features are applied to the real rows only.
  seen = []
  baselines.nearest_neighbour(ep, lambda x: seen.append(len(x)) or x)
  assert seen == [6, 2]


def test_baselines_run_on_pipeline_episodes(tiny_dir):
  from ctx_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from experiments import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("smoke")
  config.data.records_root = str(tiny_dir.parent)
  mesh = mesh_lib.make_mesh(1)
  accs = {}
  for name, fn in (("pixels", None),
                   ("hog", lambda ep: baselines.nearest_class_mean(
                       ep, baselines.hog_features))):
    accs[name] = evaluate.source_accuracies(
        None, config, mesh, "TRAIN", tiny_dir.name, 3, 0, baseline=fn)
  for values in accs.values():
    assert len(values) == 3 and all(0.0 <= a <= 1.0 for a in values)


def test_hog_features_ignore_colour_and_polarity():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  f = baselines.hog_features(images)
  assert f.shape[0] == 2
  np.testing.assert_allclose(f, baselines.hog_features(-images), atol=1e-5)
  np.testing.assert_allclose(f, baselines.hog_features(0.5 * images + 0.2),
                             atol=1e-4)


def test_preview(tmp_path):
  path = tmp_path / "grid.png"
  demo_dataset.render_preview(TINY, str(path), class_ids=(0, 1),
                              num_instances=3)
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_works_without_jax(tmp_path):
  # Generating the data must not need JAX (only `--baselines` does): with
  # `import jax` made to fail, generation still runs. (TF 2.21 itself tries
  # `from jax import jit` in tensorflow/lite/python/util.py and tolerates
  # the ImportError, so `jax` in sys.modules after importing TF is not ours.)
  code = (
      "import sys\n"
      "sys.modules['jax'] = sys.modules['jaxlib'] = None\n"
      "from ctx_jax.demo import dataset\n"
      "dataset.main(sys.argv[1:])\n")
  subprocess.run(
      [sys.executable, "-c", code, "--output_dir", str(tmp_path / "g"),
       "--num_classes", "5", "--images_per_class", "2", "--image_size",
       "16"], check=True, capture_output=True, text=True)
  assert os.path.isfile(tmp_path / "g" / "dataset_spec.json")
  for module in (glyphs, demo_dataset, records_writer):
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in getattr(node, "names", [])}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"jax", "jaxlib", "flax"}, module.__name__
