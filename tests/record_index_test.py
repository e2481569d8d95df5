"""Sidecar record indexes (`<class>.tfrecords.index`) and ranged reads."""

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import index_cli
from meta_dataset_pipeline import record_files
from meta_dataset_pipeline import records_writer
from tests import gcs_emulator

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
  monkeypatch.setattr(record_files, "_INDEX_CACHE", {})
  monkeypatch.setattr(record_files, "_WARNED", set())
  monkeypatch.setattr(record_files, "_CHECKED", set())


def _class_file(folder, class_id=3, sizes=(10, 3000, 0, 700, 41, 5000, 9),
                seed=0, write_index=False):
  rng = np.random.default_rng(seed)
  records_writer.write_class_records(
      str(folder), class_id, [rng.bytes(n) for n in sizes],
      write_index=write_index)
  return str(folder / f"{class_id}.tfrecords")


def test_sidecar_round_trip_equals_the_header_walk(tmp_path):
  path = _class_file(tmp_path, write_index=True)
  index = record_files.index_file_path(path)
  assert index == path + ".index" and os.path.isfile(index)
  starts = record_files.index_records(path)
  want = np.append(starts, os.path.getsize(path))
  np.testing.assert_array_equal(record_files.valid_record_index(path), want)
  # Rewritten by write_record_index, with or without given offsets.
  for offsets in (None, starts, want):
    os.remove(index)
    assert record_files.write_record_index(path, offsets) == index
    np.testing.assert_array_equal(record_files.valid_record_index(path), want)
  walked = []
  real = record_files.index_records
  record_files.index_records = lambda p: walked.append(p) or real(p)
  try:
    got = record_files.load_record_offsets(path, 7, 3)
  finally:
    record_files.index_records = real
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int64 and not walked
  # Counts: check_record_count still gives the starts.
  np.testing.assert_array_equal(record_files.check_record_count(path, 7, 3),
                                starts)
  # Not a class file to anything that lists them.
  assert not records_writer.FILE_PATTERN.format(3).endswith(".index")
  assert not any(n.endswith(".index") for n in
                 spec_lib.SUPPORTED_FILE_PATTERNS)


def test_empty_class_file_and_no_sidecar(tmp_path):
  path = _class_file(tmp_path, sizes=(), write_index=True)
  np.testing.assert_array_equal(
      record_files.load_record_offsets(path, 0, 3), [0])
  other = _class_file(tmp_path, class_id=4)  # No sidecar: walked.
  assert not os.path.exists(other + ".index")
  assert record_files.valid_record_index(other) is None
  np.testing.assert_array_equal(
      record_files.load_record_offsets(other, 7, 4)[:-1],
      record_files.index_records(other))


def test_stale_sidecar_falls_back_and_warns_once(tmp_path, caplog):
  path = _class_file(tmp_path, write_index=True)
  index = path + ".index"
  stale = pathlib.Path(index).read_bytes()
  _class_file(tmp_path, sizes=(1, 2, 3, 4, 5, 6, 7, 8), seed=1)  # New size.
  # The old index back, as a copy of the folder could leave it.
  pathlib.Path(index).write_bytes(stale)
  with caplog.at_level(logging.WARNING, logger=record_files.__name__):
    got = record_files.load_record_offsets(path, 8, 3)
    record_files._INDEX_CACHE.clear()  # pylint: disable=protected-access
    record_files.load_record_offsets(path, 8, 3)
  np.testing.assert_array_equal(
      got, np.append(record_files.index_records(path),
                     os.path.getsize(path)))
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 1, warnings
  assert index in warnings[0] and "stale" in warnings[0]
  assert f"md-index {tmp_path}" in warnings[0]
  # A damaged index is ignored the same way.
  data = bytearray(stale)
  data[40] ^= 1
  pathlib.Path(index).write_bytes(bytes(data))
  record_files._WARNED.clear()  # pylint: disable=protected-access
  assert record_files.valid_record_index(path) is None
  with pytest.raises(ValueError, match="CRC mismatch"):
    record_files.decode_record_index(bytes(data), len(stale))


def test_writer_without_index_removes_the_old_one(tmp_path):
  path = _class_file(tmp_path, write_index=True)
  _class_file(tmp_path, sizes=(5, 5, 5, 5, 5, 5, 5))  # Rewritten, no index.
  assert not os.path.exists(path + ".index")


def test_count_mismatch_error(tmp_path):
  path = _class_file(tmp_path, write_index=True)
  want = (rf"3\.tfrecords: the spec lists 9 images for class 3 but the "
          r"file holds 7 records")
  with pytest.raises(record_files.RecordError, match=want):
    record_files.load_record_offsets(path, 9, 3)
  with pytest.raises(record_files.RecordError, match=want):
    record_files.check_record_count(path, 9, 3)
  # The start-up check reads the sidecar: the count fails at once.
  with pytest.raises(record_files.RecordError, match=want):
    record_files._check_file(path, 9, 3)  # pylint: disable=protected-access


@pytest.mark.parametrize("max_gap", [0, 1 << 20, None])
def test_read_records_equals_read_record(tmp_path, max_gap):
  rng = np.random.default_rng(1)
  sizes = rng.integers(0, 4000, 60)
  path = _class_file(tmp_path, sizes=sizes, write_index=True)
  offsets = record_files.load_record_offsets(path, 60, 3)
  with open(path, "rb") as f:
    want = [record_files.read_record(f, int(o)) for o in offsets[:-1]]
  for trial in range(20):
    indices = rng.integers(0, 60, rng.integers(1, 25))  # Repeats too.
    if trial == 0:
      indices = np.arange(60)[::-1]
    got = record_files.read_records(path, indices, offsets, 3,
                                    max_gap=max_gap)
    assert [bytes(g) for g in got] == [want[i] for i in indices]
  with open(path, "rb") as f:  # An open file, left open.
    got = record_files.read_records(path, [5, 5, 0], offsets, 3, 64, f=f)
    assert not f.closed
  assert got == [want[5], want[5], want[0]]
  assert record_files.read_records(path, [], offsets, 3) == []
  with pytest.raises(IndexError, match="record 60 requested"):
    record_files.read_records(path, [1, 60], offsets, 3)


def test_read_records_from_a_url_file_system(tmp_path):
  """On a URL file system: one ranged read per merged range, slices."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  path = _class_file(tmp_path, sizes=rng.integers(0, 3000, 40),
                     write_index=True)
  remote = f"ram://index-{os.getpid()}-{rng.integers(1 << 30)}/3.tfrecords"
  tf.io.gfile.makedirs(remote.rsplit("/", 1)[0])
  for p in (path, path + ".index"):
    tf.io.gfile.copy(p, remote + p[len(path):])
  offsets = record_files.load_record_offsets(remote, 40, 3)
  np.testing.assert_array_equal(
      offsets, record_files.load_record_offsets(path, 40, 3))
  reads = []
  real = record_files.files.open_ranges

  def counting(p):
    f = real(p)
    read = f.read
    f.read = lambda n: reads.append(n) or read(n)
    return f

  record_files.files.open_ranges = counting
  try:
    for gap in (0, 2000, 1 << 20):
      for indices in ([3, 9, 3, 0, 39], list(range(40)), [20]):
        want = record_files.read_records(path, indices, offsets, 3)
        reads.clear()
        got = record_files.read_records(remote, indices, offsets, 3,
                                        max_gap=gap)
        assert got == want
        if gap == 1 << 20:  # All in one read.
          assert len(reads) == 1
    with pytest.raises(record_files.RecordError, match="cut short"):
      record_files.read_records(remote, [39], offsets[:-1].tolist() + [
          offsets[-1] + 10], 3)
  finally:
    record_files.files.open_ranges = real
    tf.io.gfile.rmtree(remote.rsplit("/", 1)[0])


@pytest.mark.parametrize("where,why", [
    ("data", "data CRC mismatch"), ("length_crc", "length CRC mismatch"),
    ("length", "length CRC mismatch"), ("cut", "record cut short")])
def test_corrupt_record_is_named(tmp_path, where, why):
  path = _class_file(tmp_path, sizes=(100,) * 6, write_index=True)
  offsets = record_files.load_record_offsets(path, 6, 3)
  data = bytearray(pathlib.Path(path).read_bytes())
  start = int(offsets[4])
  if where == "data":
    data[start + 12 + 50] ^= 1
  elif where == "length_crc":
    data[start + 9] ^= 1
  elif where == "length":
    data[start] ^= 1
  else:
    data = data[:start + 40]
  pathlib.Path(path).write_bytes(bytes(data))
  want = (rf"{path}: record 4 \(byte {start}\) of class 3 is corrupt: "
          f"{why}")
  for gap in (0, 1 << 20):
    with pytest.raises(record_files.RecordError, match=want) as e:
      record_files.read_records(path, [0, 4, 1], offsets, 3, max_gap=gap)
    assert "\n" not in str(e.value)
  # The other records still read.
  assert len(record_files.read_records(path, [0, 1, 2], offsets, 3)) == 3


def test_length_field_disagreeing_with_the_index(tmp_path):
  path = _class_file(tmp_path, sizes=(100,) * 3, write_index=True)
  offsets = record_files.load_record_offsets(path, 3, 3).copy()
  offsets[1] += 16  # Record 0 (a 134-byte Example) 16 bytes longer.
  with pytest.raises(record_files.RecordError,
                     match=r"record 0 \(byte 0\) of class 3 is corrupt: its "
                     "length field says 134 bytes but the index says 150"):
    record_files.read_records(path, [0], offsets, 3)


def _write_folder(folder, counts=(4, 6, 5)):
  folder.mkdir()
  rng = np.random.default_rng(0)
  for c, n in enumerate(counts):
    records_writer.write_class_records(
        str(folder), c, [rng.bytes(int(k)) for k in rng.integers(1, 900, n)])
  records_writer.write_dataset_spec(str(folder), records_writer.dataset_spec_dict(
      "tiny", {"TRAIN": 1, "VALID": 1, "TEST": 1}, counts,
      ["a", "b", "c"], str(folder)))
  return folder


def test_md_index_writes_valid_sidecars_and_is_idempotent(tmp_path, capsys):
  folder = _write_folder(tmp_path / "tiny")
  assert index_cli.main([str(folder)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"md-index {folder}: 3 class files, 3 indexed, 0 "
                        "already indexed, 15 records")
  for c in range(3):
    path = str(folder / f"{c}.tfrecords")
    np.testing.assert_array_equal(
        record_files.valid_record_index(path)[:-1],
        record_files.index_records(path))
  mtimes = sorted(p.stat().st_mtime_ns for p in folder.glob("*.index"))
  assert index_cli.main([str(folder)]) == 0
  assert "0 indexed, 3 already indexed" in capsys.readouterr().out
  assert sorted(p.stat().st_mtime_ns for p in folder.glob("*.index")) == (
      mtimes)
  assert index_cli.main([str(folder), "--force"]) == 0
  assert "3 indexed, 0 already" in capsys.readouterr().out
  # The spec and the start-up check ignore the sidecars.
  spec = spec_lib.load_dataset_spec(folder)
  assert record_files.check_class_files(spec, "TRAIN") == [
      str(folder / "0.tfrecords")]


def _md_index(*args):
  return subprocess.run(
      [sys.executable, "-m", "meta_dataset_pipeline.index_cli",
       *map(str, args)], env=ENV, capture_output=True, text=True,
      timeout=120, check=False)


def test_md_index_errors_are_one_line(tmp_path):
  proc = _md_index(tmp_path / "missing")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"md-index: error: no dataset spec: {tmp_path / 'missing'} does not "
      "exist (expected a records folder holding dataset_spec.json, or a "
      "spec file)"]
  folder = _write_folder(tmp_path / "tiny", counts=(4, 6, 5))
  spec = (folder / "dataset_spec.json").read_text()
  (folder / "dataset_spec.json").write_text(spec.replace('"1": 6', '"1": 7'))
  proc = _md_index(folder)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"md-index: error: {folder}/1.tfrecords: the spec lists 7 images for "
      "class 1 but the file holds 6 records"]
  (folder / "2.tfrecords").unlink()
  proc = _md_index(folder)
  assert proc.returncode == 1
  assert "1 class record files of 'tiny' are missing" in proc.stderr
  assert "2.tfrecords" in proc.stderr


def test_sidecar_on_a_bucket_spares_the_class_file(tmp_path):
  """On gs://: md-index writes the sidecars, offsets come from them alone."""
  folder = _write_folder(tmp_path / "tiny")  # No sidecars.
  code = (
      "import sys, json\n"
      "from meta_dataset_pipeline import index_cli\n"
      "from meta_dataset_pipeline import record_files as r\n"
      "root = sys.argv[1]\n"
      "input()\n"
      "index_cli.main([root])\n"
      "input()\n"
      "o = r.load_record_offsets(root + '/1.tfrecords', 6, 1)\n"
      "print(json.dumps(o.tolist()), flush=True)\n"
      "input()\n"
      "recs = r.read_records(root + '/1.tfrecords', [5, 0, 5], o, 1)\n"
      "print(json.dumps([x.hex() for x in recs]), flush=True)\n")
  with gcs_emulator.gcs_emulator() as gcs:
    root = gcs.upload_tree(folder, "tiny")
    proc = subprocess.Popen([sys.executable, "-c", code, root], env=gcs.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    logs, out = [], []
    try:
      for _ in range(3):  # md-index; offsets; records.
        gcs.stats.reset()
        proc.stdin.write("\n")
        proc.stdin.flush()
        out.append(proc.stdout.readline().strip())
        logs.append(list(gcs.stats.log))
    finally:
      proc.stdin.close()
      proc.stdout.close()
      assert proc.wait(60) == 0
    names = gcs.object_names("tiny/")
    index_bytes = gcs.read_object("tiny/1.tfrecords.index")
  assert out[0].startswith(f"md-index {root}: 3 class files, 3 indexed")
  assert [n for n in names if n.endswith(".index")] == [
      f"tiny/{c}.tfrecords.index" for c in range(3)]
  local = str(folder / "1.tfrecords")
  want = record_files.index_records(local)
  np.testing.assert_array_equal(
      record_files.decode_record_index(index_bytes, os.path.getsize(local)),
      np.append(want, os.path.getsize(local)))
  offsets, records = out[1], out[2]
  assert offsets == str(np.append(want, os.path.getsize(local)).tolist())
  assert records == str([x.hex() for x in record_files.read_records(
      local, [5, 0, 5], record_files.load_record_offsets(local, 6, 1), 1)
                        ]).replace("'", '"')
  bucket_path = "/" + gcs.bucket + "/tiny/"
  # Offsets: the class file is never downloaded, only its sidecar.
  used = logs[1]
  assert not [e for e in used if e[1] == bucket_path + "1.tfrecords"], used
  assert [e for e in used if e[1] == bucket_path + "1.tfrecords.index"]
  assert len(used) <= 4, used


def test_md_convert_folders_keep_working_without_tensorflow(tmp_path):
  # md-index and the sidecar reads of local files need no TensorFlow.
  folder = _write_folder(tmp_path / "tiny")
  code = ("import sys; from meta_dataset_pipeline import index_cli, "
          f"record_files; index_cli.main([{str(folder)!r}]); "
          f"record_files.load_record_offsets({str(folder / '0.tfrecords')!r}"
          ", 4, 0); print('tensorflow' in sys.modules, 'jax' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], env=ENV,
                        capture_output=True, text=True, check=True)
  assert proc.stdout.split()[-2:] == ["False", "False"]
  shutil.rmtree(folder)
