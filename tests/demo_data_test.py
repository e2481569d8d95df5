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

from meta_dataset_pipeline import demo_data
from meta_dataset_pipeline import records_writer

# 9 classes -> 6 train, 1 valid, 2 test (16% and 20%, at least 1 each).
TINY = demo_data.DemoConfig(num_classes=9, images_per_class=4, image_size=32,
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
  demo_data.generate_dataset(str(out), TINY)
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
  glyphs = [demo_data.class_glyph(TINY, c) for c in range(9)]
  flat = [np.concatenate([s.points.ravel() for s in g]) for g in glyphs]
  for i in range(9):
    for j in range(i + 1, 9):
      assert flat[i].shape != flat[j].shape or not np.allclose(
          flat[i], flat[j])
  # Families never straddle splits.
  for c in range(9):
    start = demo_data.family_start(TINY, c)
    split_of = [s for s in ids if c in ids[s]][0]
    assert start in ids[split_of]


def test_deterministic_byte_identical(tmp_path, monkeypatch):
  # Same relative --output_dir from two working directories: every file,
  # dataset_spec.json included (its `path` is stored as given), is equal.
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path / sub)
    assert demo_data.main(["--output_dir", "glyphs"] + TINY_ARGS) == 0
  first = _read_dir(tmp_path / "a" / "glyphs")
  assert first == _read_dir(tmp_path / "b" / "glyphs")
  # A different seed changes the images.
  monkeypatch.chdir(tmp_path)
  demo_data.generate_dataset(
      "other", demo_data.DemoConfig(num_classes=9, images_per_class=4,
                                    image_size=32, seed=1))
  other = _read_dir(tmp_path / "other")
  assert other["0.tfrecords"] != first["0.tfrecords"]


def test_instances_do_not_depend_on_count():
  few = demo_data.render_class(TINY, 3, num_images=2)
  many = demo_data.render_class(TINY, 3, num_images=4)
  np.testing.assert_array_equal(few[0], many[0])
  np.testing.assert_array_equal(few[1], many[1])


def test_png_format(tmp_path):
  cfg = demo_data.DemoConfig(num_classes=3, images_per_class=2,
                             image_size=16, image_format="png")
  demo_data.generate_dataset(str(tmp_path / "p"), cfg)
  (image, label, _, encoded), _ = _parse_class_file(tmp_path / "p" /
                                                     "2.tfrecords")
  assert encoded[:4] == b"\x89PNG" and label == 2
  assert image.shape == (16, 16, 3)


def test_refuses_non_empty_dir_without_overwrite(tmp_path, capsys):
  out = tmp_path / "glyphs"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(SystemExit) as e:
    demo_data.main(["--output_dir", str(out)] + TINY_ARGS)
  err = _err(e, capsys)
  assert str(out) in err and "not empty" in err
  assert os.listdir(out) == ["keep.txt"]
  assert (out / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["glyphs"]  # No leftovers.
  capsys.readouterr()


def test_overwrite_replaces_only_a_generated_dataset(tmp_path, capsys):
  out = tmp_path / "glyphs"
  demo_data.main(["--output_dir", str(out)] + TINY_ARGS)
  before = _read_dir(out)
  # Without --overwrite: error, old dataset untouched.
  with pytest.raises(SystemExit) as e:
    demo_data.main(["--output_dir", str(out), "--seed", "1"] + TINY_ARGS[:6])
  err = _err(e, capsys)
  assert str(out) in err
  assert _read_dir(out) == before
  # With --overwrite: replaced.
  assert demo_data.main(["--output_dir", str(out), "--overwrite", "--seed",
                         "1"] + TINY_ARGS[:6]) == 0
  after = _read_dir(out)
  assert after.keys() == before.keys() and after != before
  # A folder with a foreign file is never deleted, even with --overwrite.
  (out / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit) as e:
    demo_data.main(["--output_dir", str(out), "--overwrite"] + TINY_ARGS)
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
    demo_data.main(["--output_dir", str(out)] + TINY_ARGS)
  err = _err(e, capsys)
  assert str(out) in err
  assert blocker.read_text() == "x"
  with pytest.raises(SystemExit) as e:
    demo_data.main(["--output_dir", str(blocker)] + TINY_ARGS)
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
      demo_data.main(["--output_dir", str(parent / "glyphs")] + TINY_ARGS)
    err = _err(e, capsys)
    assert str(parent / "glyphs") in err
  finally:
    parent.chmod(0o755)


def test_interrupted_run_keeps_old_dataset(tmp_path, monkeypatch):
  out = tmp_path / "glyphs"
  demo_data.generate_dataset(str(out), TINY)
  before = _read_dir(out)
  real_write = records_writer.write_class_records

  def failing_write(records_dir, class_id, images):
    if class_id == 4:
      raise KeyboardInterrupt
    return real_write(records_dir, class_id, images)

  monkeypatch.setattr(records_writer, "write_class_records", failing_write)
  with pytest.raises(KeyboardInterrupt):
    demo_data.generate_dataset(str(out), TINY, overwrite=True)
  assert _read_dir(out) == before
  with pytest.raises(KeyboardInterrupt):
    demo_data.generate_dataset(str(tmp_path / "new"), TINY)
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
    demo_data.main(["--output_dir", "unused", "--num_classes", "2"])
  err = _err(e, capsys)
  assert "num_classes" in err or "2 classes" in err
  assert not os.path.exists("unused")


def test_baselines_run_on_tiny(tiny_dir):
  acc = demo_data.pixel_nn_accuracy(str(tiny_dir), split="TRAIN",
                                    num_episodes=4, ways=3, shots=2,
                                    queries=2, image_size=24)
  assert set(acc) == {"1nn", "ncm"}
  for mean, ci in acc.values():
    assert 0.0 <= mean <= 1.0 and ci >= 0.0
  acc = demo_data.shape_feature_nn_accuracy(
      str(tiny_dir), split="TRAIN", num_episodes=4, ways=3, shots=2,
      queries=2, image_size=24)
  for mean, ci in acc.values():
    assert 0.0 <= mean <= 1.0 and ci >= 0.0


def test_hog_features_ignore_colour_and_polarity():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  f = demo_data.hog_features(images)
  assert f.shape[0] == 2
  np.testing.assert_allclose(f, demo_data.hog_features(-images), atol=1e-5)
  np.testing.assert_allclose(f, demo_data.hog_features(0.5 * images + 0.2),
                             atol=1e-4)


def test_preview(tmp_path):
  path = tmp_path / "grid.png"
  demo_data.render_preview(TINY, str(path), class_ids=(0, 1),
                           num_instances=3)
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_works_without_jax(tmp_path):
  # The data package must not need JAX: with `import jax` made to fail,
  # generation and the baselines still run. (TF 2.21 itself tries
  # `from jax import jit` in tensorflow/lite/python/util.py and tolerates
  # the ImportError, so `jax` in sys.modules after importing TF is not ours.)
  code = (
      "import sys\n"
      "sys.modules['jax'] = sys.modules['jaxlib'] = None\n"
      "from meta_dataset_pipeline import demo_data\n"
      "demo_data.main(sys.argv[1:])\n"
      "print(demo_data.pixel_nn_accuracy(sys.argv[2], 'TRAIN', 2, 2, 1, 1, "
      "16))\n")
  subprocess.run(
      [sys.executable, "-c", code, "--output_dir", str(tmp_path / "g"),
       "--num_classes", "5", "--images_per_class", "2", "--image_size",
       "16"], check=True, capture_output=True, text=True)
  assert os.path.isfile(tmp_path / "g" / "dataset_spec.json")
  for module in (demo_data, records_writer):
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in getattr(node, "names", [])}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"jax", "jaxlib", "flax"}, module.__name__
