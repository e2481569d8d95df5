"""md-convert: equal to the official converter, resumable, parallel, checked.

The equality tests convert the tiny raw downloads of
`tests/md_convert_fixtures/raw/` and compare with what the official
converter wrote from the same files (`tests/md_convert_fixtures/official/`,
made as its README says).
"""

import importlib.util
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import PIL
from PIL import Image
import pytest

from meta_dataset_pipeline import record_files
from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline.conversion import cli
from meta_dataset_pipeline.conversion import common
from meta_dataset_pipeline.conversion import records
from meta_dataset_pipeline.conversion import runner
from meta_dataset_pipeline.conversion import verify

FIXTURES = pathlib.Path(__file__).parent / "md_convert_fixtures"
SOURCES = sorted(cli.PLANNERS)
FLAT_SOURCES = [s for s in SOURCES if not s.startswith("ilsvrc")]
BIN = pathlib.Path(sys.executable).parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
# The official records were made with this Pillow (and its libjpeg-turbo);
# re-encoded JPEGs are byte-equal only with the same encoder.
OFFICIAL_PILLOW = "13.0.0"
# With another Pillow, decoded re-encoded pixels may differ by DCT rounding.
PIXEL_TOLERANCE = 4


def _convert(source, tmp_path, workers=1):
  """Converts a raw fixture in-process; returns the records folder."""
  splits = tmp_path / "splits"
  shutil.copytree(FIXTURES / "splits", splits, dirs_exist_ok=True)
  out = tmp_path / "records" / source
  plan = cli.PLANNERS[source](str(FIXTURES / "raw" / source), str(splits))
  runner.convert(plan, str(out), workers=workers, stream=None)
  return out


def _example(image, label, label_first):
  """A two-feature Example with its map entries in the given order."""
  # pylint: disable=protected-access
  field = records_writer._len_field
  entries = [
      field(1, field(1, b"image") + field(2, field(1, field(1, image)))),
      field(1, field(1, b"label") +
            field(2, field(3, field(1, records_writer._varint(label))))),
  ]
  return field(1, b"".join(entries[::-1] if label_first else entries))


def _decoded(image):
  return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), np.int16)


def _assert_same_records(ours, official, spec_key_order=True):
  """Asserts a converted folder equals the official converter's.

  Ours also holds a valid sidecar record index beside each class file.
  """
  indexes = [n for n in os.listdir(ours) if n.endswith(".index")]
  assert sorted(set(os.listdir(ours)) - set(indexes)) == sorted(
      os.listdir(official))
  class_files = [n for n in os.listdir(ours) if n.endswith(".tfrecords")]
  assert sorted(indexes) == sorted(n + ".index" for n in class_files)
  for name in class_files:
    offsets = record_files.valid_record_index(str(ours / name))
    np.testing.assert_array_equal(
        offsets[:-1], record_files.index_records(str(ours / name)))

  # The spec: same JSON, bar the records path (stored as given).
  ours_spec = json.loads((ours / "dataset_spec.json").read_text())
  official_spec = json.loads((official / "dataset_spec.json").read_text())
  assert ours_spec.pop("path") == str(ours)
  official_spec.pop("path")
  if spec_key_order:
    assert json.dumps(ours_spec) == json.dumps(official_spec)
  else:
    assert list(ours_spec) == list(official_spec)
    assert ours_spec == official_spec

  same_encoder = PIL.__version__ == OFFICIAL_PILLOW
  num_records = 0
  for name in sorted(os.listdir(official)):
    if not name.endswith(".tfrecords"):
      continue
    ours_file = (ours / name).read_bytes()
    official_records = list(records.iter_records(str(official / name)))
    ours_records = list(records.iter_records(str(ours / name)))
    assert len(ours_records) == len(official_records), name
    # TF's framing is ours: the official file is its records, framed by us.
    assert (official / name).read_bytes() == b"".join(
        records_writer.tfrecord_frame(r) for r in official_records)
    assert ours_file == b"".join(
        records_writer.tfrecord_frame(r) for r in ours_records)
    for i, (mine, theirs) in enumerate(zip(ours_records, official_records)):
      mine_ex = records.parse_example(mine)
      theirs_ex = records.parse_example(theirs)
      assert mine_ex["label"] == theirs_ex["label"] == [int(name[:-10])]
      image = mine_ex["image"][0]
      if same_encoder:
        # Byte-equal records, up to the order of the Example's two map
        # entries, which the official (non-deterministic) serialization
        # does not fix: it varies between runs of the official converter.
        assert theirs in (_example(image, mine_ex["label"][0], False),
                          _example(image, mine_ex["label"][0], True)), (
                              name, i)
      else:
        diff = np.abs(_decoded(image) - _decoded(theirs_ex["image"][0]))
        assert diff.max() <= PIXEL_TOLERANCE, (name, i)
      num_records += 1
  return ours_spec, num_records


@pytest.mark.parametrize("source", FLAT_SOURCES)
def test_equal_to_official_converter(source, tmp_path):
  ours = _convert(source, tmp_path)
  spec, num_records = _assert_same_records(
      ours, FIXTURES / "official" / source)
  assert num_records == sum(spec["images_per_class"].values())
  assert num_records > 0


def _make_raw():
  """The fixture generator, as a module."""
  spec = importlib.util.spec_from_file_location(
      "make_raw", FIXTURES / "make_raw.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def ilsvrc_raw(tmp_path_factory):
  raw = tmp_path_factory.mktemp("ilsvrc") / "raw"
  _make_raw().materialize_ilsvrc(str(FIXTURES / "raw" / "ilsvrc_2012"),
                                 str(raw))
  return raw


@pytest.mark.parametrize("source", ["ilsvrc_2012", "ilsvrc_2012_v2"])
def test_ilsvrc_equal_to_official_converter(source, ilsvrc_raw, tmp_path):
  with tarfile.open(FIXTURES / "official" / f"{source}.tar.gz") as tar:
    tar.extractall(tmp_path / "official", filter="data")
  official = tmp_path / "official" / source
  ours = tmp_path / "records" / source
  plan = cli.PLANNERS[source](str(ilsvrc_raw), str(tmp_path / "splits"))
  runner.convert(plan, str(ours), stream=None)
  # The official key order of each split's `images_per_class` is the
  # iteration order of a set of Python objects, which varies from run to
  # run; ours is sorted. Everything else is equal as JSON text.
  spec, num_records = _assert_same_records(ours, official,
                                           spec_key_order=False)
  assert ((ours / "num_leaf_images.json").read_bytes() ==
          (official / "num_leaf_images.json").read_bytes())
  # 4 + 2 + 3 + 3: the duplicate is left out, the unreadable file skipped.
  assert num_records == 12
  # The split DAGs are the official canonical ones.
  canonical = _shared_spec(source)
  assert spec["split_subgraphs"] == canonical["split_subgraphs"]
  assert spec["class_names"] == canonical["class_names"]
  leaf_counts = json.loads((ours / "num_leaf_images.json").read_text())
  assert leaf_counts["n01531178"] == 2
  assert leaf_counts["n02666196"] == 4
  # As upstream, the unreadable file counts in the spec but has no record;
  # --verify reports that mismatch, and nothing else.
  abacus_id = [k for k, v in spec["class_names"].items()
               if v == "n02666196"][0]
  assert verify.verify(str(ours)) == [
      f"{ours / (abacus_id + '.tfrecords')}: 3 records, the spec lists 4"]


def test_ilsvrc_missing_class_folder_is_named(ilsvrc_raw, tmp_path):
  raw = tmp_path / "raw"
  shutil.copytree(ilsvrc_raw, raw)
  shutil.rmtree(raw / "n01443537")
  with pytest.raises(common.ConversionError,
                     match="1 missing, e.g. .*n01443537"):
    cli.PLANNERS["ilsvrc_2012"](str(raw), str(tmp_path / "splits"))


SHARED_SPECS = (pathlib.Path(__file__).parents[1].parent / "shared" /
                "fixtures" / "official_specs")


def _shared_json(path):
  if not path.is_file():
    pytest.skip(f"{path} not found: the shared fixtures sit beside the repo")
  return json.loads(path.read_text())


def _shared_spec(source):
  return _shared_json(SHARED_SPECS / "dataset_specs" /
                      f"{source}_dataset_spec.json")


def _official_splits(source):
  return _shared_json(SHARED_SPECS / "splits" / f"{source}_splits.json")


def _touch(path, data=b""):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _plan_only_tree(source, root, names):
  """The least raw tree a planner needs to draw the splits of `names`."""
  if source == "dtd":
    for n in names:
      (root / "images" / n).mkdir(parents=True)
  elif source == "cu_birds":
    names = sorted(names)  # "001.Black_footed_Albatross", ...
    _touch(root / "classes.txt", "".join(
        f"{i + 1} {n}\n" for i, n in enumerate(names)).encode())
    for n in names:
      (root / "images" / n).mkdir(parents=True)
  elif source == "traffic_sign":
    for i in range(43):
      (root / "Final_Training" / "Images" / f"{i:05d}").mkdir(parents=True)
  elif source == "vgg_flower":
    import scipy.io  # pylint: disable=g-import-not-at-top
    (root / "jpg").mkdir(parents=True)
    scipy.io.savemat(root / "imagelabels.mat",
                     {"labels": np.arange(1, 103)[None]})
  elif source == "aircraft":
    names = sorted(names)
    _touch(root / "data" / "variants.txt",
           "".join(n + "\n" for n in names).encode())
    _touch(root / "data" / "images_box.txt", "".join(
        f"{i:07d} 1 1 5 5\n" for i in range(len(names))).encode())
    _touch(root / "data" / "images_variant_trainval.txt", "".join(
        f"{i:07d} {n}\n" for i, n in enumerate(names)).encode())
    _touch(root / "data" / "images_variant_test.txt")
  elif source == "fungi":
    names = sorted(names)
    cats = [{"id": int(n[:4]), "name": n[5:]} for n in names]
    data = {"categories": cats,
            "images": [{"id": i, "file_name": f"images/{i}.JPG"}
                       for i in range(len(names))],
            "annotations": [{"id": i, "image_id": i, "category_id": i}
                            for i in range(len(names))]}
    _touch(root / "train.json", json.dumps(data).encode())
    _touch(root / "val.json", json.dumps(
        dict(data, images=[], annotations=[])).encode())
  elif source == "mscoco":
    # The official split draws over the categories in the annotation file's
    # order (COCO's, by id), which the split file does not record.
    assert sorted(COCO_CATEGORIES) == sorted(names)
    (root / "train2017").mkdir(parents=True)
    ids = [i + 1 + i // 12 for i in range(80)]  # non-contiguous, as COCO's
    _touch(root / "instances_train2017.json", json.dumps({
        "categories": [{"id": i, "name": n, "supercategory": "x"}
                       for i, n in zip(ids, COCO_CATEGORIES)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                         "bbox": [0, 0, 1, 1]}]}).encode())
  elif source == "quickdraw":
    root.mkdir(parents=True)
    for n in names:
      np.save(root / f"{n}.npy", np.zeros((1, 784), np.uint8))
  else:
    raise ValueError(source)


COCO_CATEGORIES = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, "
    "traffic light, fire hydrant, stop sign, parking meter, bench, bird, cat, "
    "dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, "
    "umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, "
    "kite, baseball bat, baseball glove, skateboard, surfboard, "
    "tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, "
    "banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, "
    "donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, "
    "laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, "
    "sink, refrigerator, book, clock, vase, scissors, teddy bear, "
    "hair drier, toothbrush").split(", ")


@pytest.mark.parametrize("source", ["aircraft", "cu_birds", "dtd", "fungi",
                                    "mscoco", "quickdraw", "traffic_sign",
                                    "vgg_flower"])
def test_drawn_splits_equal_official_split_files(source, tmp_path):
  # No split file given: the splits are drawn with the official seed and
  # rule, and written, as the official converter does.
  official = _official_splits(source)
  names = [n for k in ("train", "valid", "test") for n in official[k]]
  _plan_only_tree(source, tmp_path / "raw", names)
  splits_root = tmp_path / "splits"
  plan = cli.PLANNERS[source](str(tmp_path / "raw"), str(splits_root))
  written = json.loads((splits_root / f"{source}_splits.json").read_text())
  assert written == official
  assert [j.name for j in plan.jobs] == names
  assert [j.class_id for j in plan.jobs] == list(range(len(names)))


def _md_convert(*args, timeout=120):
  return subprocess.run([str(BIN / "md-convert"), *map(str, args)],
                        env=ENV, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _read_dir(path):
  """{file: bytes} of a records folder, the spec's `path` field blanked."""
  out = {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}
  if "dataset_spec.json" in out:
    spec = json.loads(out["dataset_spec.json"])
    assert spec["path"] == str(path)
    out["dataset_spec.json"] = out["dataset_spec.json"].replace(
        json.dumps(str(path)).encode(), b'"<path>"')
  return out


def test_resume_skips_complete_classes_and_redoes_partial(tmp_path):
  reference = _read_dir(_convert("dtd", tmp_path / "a"))
  out = _convert("dtd", tmp_path / "b")
  # A killed run: two classes never finished (one left a temporary file),
  # no spec yet.
  (out / "1.tfrecords").unlink()
  (out / "3.tfrecords").unlink()
  (out / "dataset_spec.json").unlink()
  partial = out / f"{records_writer.TMP_PREFIX}1.tfrecords.123.abc"
  partial.write_bytes(reference["1.tfrecords"][:50])
  # Killed between a class file and its index.
  (out / "2.tfrecords.index").unlink()
  kept = {n: os.stat(out / n).st_mtime_ns for n in ("0.tfrecords",
                                                     "2.tfrecords")}
  time.sleep(0.01)
  _convert("dtd", tmp_path / "b")
  assert _read_dir(out) == reference
  assert "2.tfrecords.index" in reference
  assert not partial.exists()
  assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept


def _write_quickdraw(root, num_classes, per_class):
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for k in range(num_classes):
    np.save(root / f"class{k}.npy",
            rng.integers(0, 256, size=(per_class, 784), dtype=np.uint8))
  return root


def test_killed_conversion_resumes_to_identical_records(tmp_path):
  raw = _write_quickdraw(tmp_path / "raw", num_classes=8, per_class=800)
  common_args = ["--dataset", "quickdraw", "--data_root", raw,
                 "--splits_root", tmp_path / "splits"]
  # Uninterrupted, 2 worker processes.
  full = _md_convert(*common_args, "--records_root", tmp_path / "full",
                     "--workers", 2)
  assert full.returncode == 0, full.stderr
  assert "6400/6400 images" in full.stderr
  assert "images/s, ETA" in full.stderr

  # One process, SIGKILLed once its first class file is complete.
  out = tmp_path / "killed" / "quickdraw"
  proc = subprocess.Popen(
      [str(BIN / "md-convert"), *map(str, common_args), "--records_root",
       tmp_path / "killed", "--workers", "1", "--quiet"], env=ENV)
  deadline = time.monotonic() + 60
  while not (out / "0.tfrecords").exists() and time.monotonic() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (out / "dataset_spec.json").exists()
  assert len([f for f in os.listdir(out) if f.endswith(".tfrecords")]) < 8

  resumed = _md_convert(*common_args, "--records_root", tmp_path / "killed",
                        "--workers", "1")
  assert resumed.returncode == 0, resumed.stderr
  assert "already done" in resumed.stderr
  assert _read_dir(out) == _read_dir(tmp_path / "full" / "quickdraw")
  assert _md_convert("--dataset", "quickdraw", "--records_root",
                     tmp_path / "killed", "--verify").returncode == 0


def test_verify_accepts_official_and_converted_records(tmp_path):
  ours = _convert("omniglot", tmp_path)
  assert not verify.verify(str(ours))
  for source in FLAT_SOURCES:
    assert not verify.verify(str(FIXTURES / "official" / source)), source
  # A bigger official conversion (1450 images, both map-entry orders).
  shared_dtd = SHARED_SPECS.parent / "md_records" / "dtd"
  if shared_dtd.is_dir():
    assert not verify.verify(str(shared_dtd), workers=2)
  proc = _md_convert("--dataset", "omniglot", "--records_root",
                     tmp_path / "records", "--verify")
  assert proc.returncode == 0
  assert proc.stdout.strip().endswith("OK")


def test_verify_lists_every_problem(tmp_path):
  out = _convert("traffic_sign", tmp_path)  # 2 classes of 6 images
  for f in ("0", "1"):
    assert records.count_records(str(out / f"{f}.tfrecords")) == 6
  # Class 0: a flipped image byte (data CRC), then a truncated tail.
  data = bytearray((out / "0.tfrecords").read_bytes())
  data[100] ^= 0xFF
  (out / "0.tfrecords").write_bytes(bytes(data))
  # Class 1: a record with the wrong label, one that does not decode, and
  # one record too many.
  with open(out / "1.tfrecords", "ab") as f:
    f.write(records_writer.tfrecord_frame(
        records_writer.serialize_example(b"not an image", 1)))
  good = list(records.iter_records(str(out / "1.tfrecords")))[0]
  image = records.parse_example(good)["image"][0]
  with open(out / "1.tfrecords", "ab") as f:
    f.write(records_writer.tfrecord_frame(
        records_writer.serialize_example(image, 7)))
  (out / f"{records_writer.TMP_PREFIX}0.tfrecords.1.x").write_bytes(b"x")
  problems = verify.verify(str(out))
  text = "\n".join(problems)
  assert f"{out / '0.tfrecords'}: record 0: bad data CRC" in text
  assert f"{out / '1.tfrecords'}: record 6: image does not decode" in text
  assert f"{out / '1.tfrecords'}: record 7: label [7], expected [1]" in text
  assert f"{out / '1.tfrecords'}: 8 records, the spec lists 6" in text
  assert "temporary file of an interrupted conversion" in text
  # Class 1's sidecar index was made for the file before the appends.
  assert (f"{out / '1.tfrecords.index'}: unusable record index (stale: "
          "made for a file of") in text
  assert text.count("record index") == 1
  assert len(problems) == 6, problems

  (out / "0.tfrecords").write_bytes(bytes(data[:-3]))
  (out / "1.tfrecords").unlink()
  problems = verify.verify(str(out))
  assert any("truncated" in p for p in problems), problems
  assert f"{out / '1.tfrecords'}: missing (class 1)" in problems
  assert verify.verify(str(out), workers=2) == problems
  proc = _md_convert("--dataset", "traffic_sign", "--records_root",
                     tmp_path / "records", "--verify", "--workers", "2")
  assert proc.returncode == 1
  assert "missing (class 1)" in proc.stdout
  assert proc.stdout.strip().endswith("problem(s)")


# (source, path under the raw folder to delete, what the error names)
MISSING = [
    ("omniglot", "images_background", "images_background"),
    ("omniglot", "images_evaluation/Test_03", "20 alphabet folders"),
    ("dtd", "images", "images"),
    ("cu_birds", "images", "images"),
    ("traffic_sign", "Final_Training", "Final_Training/Images"),
    ("vgg_flower", "imagelabels.mat", "imagelabels.mat"),
    ("vgg_flower", "jpg", "jpg"),
    ("aircraft", "data/images_box.txt", "data/images_box.txt"),
    ("aircraft", "data/images_variant_test.txt",
     "data/images_variant_test.txt"),
    ("fungi", "val.json", "val.json"),
    ("quickdraw", "apple.npy", "apple.npy"),
    ("mscoco", "train2017", "train2017"),
    ("mscoco", "instances_train2017.json", "instances_train2017.json"),
]


@pytest.mark.parametrize("source,missing,named", MISSING)
def test_missing_raw_input_is_named(source, missing, named, tmp_path):
  raw = tmp_path / "raw"
  shutil.copytree(FIXTURES / "raw" / source, raw)
  target = raw / missing
  if target.is_dir():
    shutil.rmtree(target)
  else:
    target.unlink()
  shutil.copytree(FIXTURES / "splits", tmp_path / "splits")
  with pytest.raises(common.ConversionError, match=named):
    cli.PLANNERS[source](str(raw), str(tmp_path / "splits"))


def test_cli_bad_input_is_one_line(tmp_path):
  proc = _md_convert("--dataset", "dtd", "--data_root", tmp_path / "nowhere",
                     "--records_root", tmp_path / "records")
  assert proc.returncode == 1
  assert proc.stderr == (f"md-convert: error: expected the raw dtd download "
                         f"(--data_root) at {tmp_path / 'nowhere'} (no such "
                         f"folder)\n")
  (tmp_path / "dtd").mkdir()
  proc = _md_convert("--dataset", "dtd", "--data_root", tmp_path / "dtd",
                     "--records_root", tmp_path / "records")
  assert proc.returncode == 1
  assert proc.stderr.startswith("md-convert: error: expected DTD's images "
                                f"folder")
  assert str(tmp_path / "dtd" / "images") in proc.stderr
  assert len(proc.stderr.splitlines()) == 1
  assert not (tmp_path / "records" / "dtd").exists()


def test_cli_usage_and_output_errors_are_one_line(tmp_path):
  proc = _md_convert("--dataset", "imagenet", "--records_root", tmp_path)
  assert proc.returncode == 1
  assert proc.stderr.startswith("md-convert: error: argument --dataset: "
                                "invalid choice: 'imagenet'")
  assert len(proc.stderr.splitlines()) == 1
  proc = _md_convert("--dataset", "dtd", "--records_root", tmp_path)
  assert proc.returncode == 1
  assert proc.stderr == ("md-convert: error: --data_root is required to "
                         "convert\n")
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  proc = _md_convert("--dataset", "dtd", "--data_root",
                     FIXTURES / "raw" / "dtd", "--records_root", blocker,
                     "--splits_root", FIXTURES / "splits")
  assert proc.returncode == 1
  assert proc.stderr.startswith("md-convert: error: ")
  assert str(blocker) in proc.stderr
  assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_stops_without_a_spec(workers, tmp_path):
  raw = tmp_path / "raw"
  shutil.copytree(FIXTURES / "raw" / "dtd", raw)
  bad = raw / "images" / "cracked" / "cracked_0002.jpg"
  bad.write_bytes(b"truncated")
  proc = _md_convert("--dataset", "dtd", "--data_root", raw,
                     "--records_root", tmp_path / "records", "--splits_root",
                     FIXTURES / "splits", "--workers", workers)
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1].startswith(
      f"md-convert: error: cannot read image {bad}")
  assert "Traceback" not in proc.stderr
  out = tmp_path / "records" / "dtd"
  # The other classes are complete (one process writes them before the bad
  # class 3); the bad class's file was never renamed; no spec.
  assert sorted(os.listdir(out)) == [
      "0.tfrecords", "0.tfrecords.index", "1.tfrecords", "1.tfrecords.index",
      "2.tfrecords", "2.tfrecords.index"]


def test_converter_imports_neither_tensorflow_nor_jax():
  code = ("import sys; import meta_dataset_pipeline.conversion.cli; "
          "print('tensorflow' in sys.modules, 'jax' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], env=ENV,
                        capture_output=True, text=True, check=True)
  assert proc.stdout.split() == ["False", "False"]


def test_python_crc32c_fallback_equals_the_c_library():
  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  for size in (0, 1, 7, 8, 9, 1000, 4099):
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    assert (records_writer._crc32c_python(data) ==
            records_writer.crc32c(data))
  assert records_writer._crc32c_python(b"123456789") == 0xE3069283


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_line():
  log = io.StringIO()
  progress = runner.Progress("dtd", num_classes=4, num_images=100,
                             num_skipped=1, stream=log, log_every_s=3600)
  progress.start -= 10  # 10 s in
  progress.update(25, 1)
  progress.update(30, 1)  # throttled: within log_every_s of the last line
  progress.update(40, 2, final=True)
  lines = log.getvalue().splitlines()
  assert len(lines) == 2
  # 25 images in 10 s: 2 images/s, 75 left: 30 s.
  assert lines[0] == ("md-convert dtd: 1/4 classes (1 already done), "
                      "25/100 images, 2 images/s, ETA 0:00:30")
  assert lines[1].startswith("md-convert dtd: 2/4 classes")
  terminal = _Terminal()
  progress = runner.Progress("dtd", 4, 100, 0, terminal)
  progress.update(0, 0)
  progress.update(100, 4, final=True)
  assert terminal.getvalue().startswith("\rmd-convert dtd: 0/4 classes")
  assert "ETA ?" in terminal.getvalue()  # no rate yet
  assert terminal.getvalue().endswith("ETA 0:00:00\n")
