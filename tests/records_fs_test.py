"""Records on non-local file systems, start-up cost, and start-up checks."""

import itertools
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tensorflow as tf

import meta_dataset_pipeline as mdp
from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline import reader
from meta_dataset_pipeline import record_files

SIZE = 16
CFG = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=2, num_query=2)


@pytest.fixture(scope="module")
def dtd_dir(shared_dir):
  return shared_dir / "fixtures" / "md_records" / "dtd"


def _copy(src, tmp_path):
  target = tmp_path / "dtd"
  shutil.copytree(src, target)
  for path in target.iterdir():
    path.chmod(0o644)
  return target


def _episodes(spec, split, num):
  ds = mdp.make_one_source_episode_dataset(spec, split, CFG, SIZE, seed=3)
  return list(itertools.islice(ds.as_numpy_iterator(), num))


def test_records_on_ram_file_system_give_the_local_episodes(dtd_dir):
  # `ram://` is a non-local file system TF registers in every build; a
  # `gs://` bucket goes through the same `tf.io.gfile` calls.
  root = f"ram://records-{uuid.uuid4().hex}/dtd"
  tf.io.gfile.makedirs(root)
  for path in dtd_dir.iterdir():
    tf.io.gfile.copy(str(path), f"{root}/{path.name}")
  remote = mdp.load_dataset_spec(root)
  assert remote.path == root
  assert remote.class_file(40) == f"{root}/40.tfrecords"
  mdp.check_sources([remote])
  local = mdp.load_dataset_spec(dtd_dir)
  for split in ("TRAIN", "TEST"):
    for got, want in zip(_episodes(remote, split, 2),
                         _episodes(local, split, 2)):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  tf.io.gfile.rmtree(root.rsplit("/", 1)[0])


def test_building_the_pipeline_reads_no_record_index(dtd_dir, monkeypatch):
  # Start-up must not scale with the number of records: no class file is
  # indexed until a record of its class is read (planning, and so resuming,
  # reads nothing).
  indexed = []
  real = record_files.index_records
  monkeypatch.setattr(record_files, "index_records",
                      lambda path: indexed.append(path) or real(path))
  monkeypatch.setattr(record_files, "_INDEX_CACHE", {})
  spec = mdp.load_dataset_spec(dtd_dir)
  ds = mdp.make_one_source_episode_dataset(spec, "TRAIN", CFG, SIZE, seed=0)
  assert not indexed
  del ds
  sampler = mdp.EpisodeDescriptionSampler(spec, "TRAIN", CFG, seed=0)
  episodes = reader.EpisodeReader([reader.Source(spec, sampler.split,
                                                 sampler)], seed=0)
  assert not indexed
  episode = episodes.plan_episode()
  assert not indexed
  episodes.read_images(episode)  # Indexes exactly its 5 classes.
  assert sorted(indexed) == sorted(
      spec.class_file(c) for c in set(episode.class_ids.tolist()))


def test_check_sources_names_a_truncated_or_missing_test_file(
    dtd_dir, tmp_path):
  target = _copy(dtd_dir, tmp_path)
  spec = mdp.load_dataset_spec(target)
  mdp.check_sources([spec], ["TRAIN", "VALID", "TEST"])
  path = target / "45.tfrecords"  # A test class.
  data = path.read_bytes()
  for cut in (len(data) - 1, len(data) // 2, 100):
    path.write_bytes(data[:cut])
    with pytest.raises(mdp.RecordError, match=r"45\.tfrecords.*truncated"):
      mdp.check_sources([spec], ["TRAIN", "VALID", "TEST"])
    mdp.check_sources([spec], ["TRAIN", "VALID"])  # Only TEST is broken.
  path.unlink()
  with pytest.raises(FileNotFoundError, match=r"45\.tfrecords"):
    mdp.check_sources([spec], ["TEST"])


def test_tail_check_finds_a_last_record_larger_than_its_window(
    tmp_path, monkeypatch):
  monkeypatch.setattr(record_files, "_TAIL_BYTES", 64)
  rng = np.random.default_rng(0)
  images = [rng.bytes(n) for n in (10, 3000, 700)]  # Last: 11x the window.
  records_writer.write_class_records(str(tmp_path), 0, images)
  path = str(tmp_path / "0.tfrecords")
  record_files._check_file(path, 3, 0)  # pylint: disable=protected-access
  data = (tmp_path / "0.tfrecords").read_bytes()
  (tmp_path / "0.tfrecords").write_bytes(data[:-5])
  with pytest.raises(mdp.RecordError, match="does not end with a complete"):
    record_files._check_file(path, 3, 0)  # pylint: disable=protected-access
  # Too small for the spec's count, whatever its content.
  with pytest.raises(mdp.RecordError, match="cannot hold the 1000 records"):
    record_files._check_file(path, 1000, 0)  # pylint: disable=protected-access


def test_every_read_verifies_the_record_crc(tmp_path):
  records_writer.write_class_records(str(tmp_path), 7, [b"a" * 50] * 4)
  path = tmp_path / "7.tfrecords"
  data = bytearray(path.read_bytes())
  offsets = reader.index_records(str(path))
  data[offsets[2] + 30] ^= 1  # Inside record 2's data.
  path.write_bytes(bytes(data))
  stream = reader.ClassStream(str(path), 4, 7, np.random.default_rng(0), 0)
  assert stream.read(1) == records_writer.serialize_example(b"a" * 50, 7)
  with pytest.raises(mdp.RecordError,
                     match=rf"7\.tfrecords: record 2 \(byte {offsets[2]}\) "
                     "of class 7 is corrupt: data CRC mismatch"):
    stream.read(2)
  stream.close()


def test_ilsvrc_replica_has_the_official_structure(shared_dir, tmp_path):
  sys.path.insert(0, "benchmarks")
  try:
    import replica_data  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove("benchmarks")
  official = mdp.load_dataset_spec(replica_data.DEFAULT_SPEC)
  summary = replica_data.write_replica(tmp_path / "r", fraction=0.002,
                                       workers=1)
  replica = mdp.load_dataset_spec(tmp_path / "r")  # Checks the DAG counts.
  for split in mdp.Split:
    assert (replica.split_subgraphs[split].leaves ==
            official.split_subgraphs[split].leaves)
  counts = [replica.get_total_images_per_class(c) for c in range(1000)]
  assert counts == [max(1, round(official.get_total_images_per_class(c)
                                 * 0.002)) for c in range(1000)]
  assert summary["records"] == sum(counts) and summary["classes"] == 1000
  mdp.check_sources([replica])


def test_index_of_a_url_file_read_in_windows(dtd_dir, monkeypatch):
  local = str(dtd_dir / "0.tfrecords")
  remote = f"ram://index-{uuid.uuid4().hex}/0.tfrecords"
  tf.io.gfile.copy(local, remote)
  want = reader.index_records(local)
  # Windows smaller than one record, then spanning several records.
  for window in (13, 5000, 60000):
    monkeypatch.setattr(record_files, "_READ_WHOLE_BYTES", 1000)
    monkeypatch.setattr(record_files, "_URL_INDEX_WINDOW_BYTES", window)
    np.testing.assert_array_equal(reader.index_records(remote), want)
    np.testing.assert_array_equal(reader.index_records(local), want)
  tf.io.gfile.remove(remote)


def test_start_up_check_needs_neither_tensorflow_nor_jax(dtd_dir):
  # So `ctx-train` can run it with its other start-up checks, before
  # TensorFlow and JAX load.
  code = ("import sys; from meta_dataset_pipeline import dataset_spec, "
          "record_files; record_files.check_sources([dataset_spec."
          f"load_dataset_spec({str(dtd_dir)!r})]); "
          "print('tensorflow' in sys.modules, 'jax' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, check=True)
  assert proc.stdout.split() == ["False", "False"]


def test_threaded_reads_give_the_serial_episodes(dtd_dir):
  spec = mdp.load_dataset_spec(dtd_dir)
  got = []
  for threads in (1, 8):
    sampler = mdp.EpisodeDescriptionSampler(spec, "TRAIN", CFG, seed=1)
    episodes = reader.EpisodeReader(
        [reader.Source(spec, sampler.split, sampler)], seed=1,
        read_threads=threads)
    got.append([episodes.next_episode().images for _ in range(3)])
  assert got[0] == got[1] and all(got[0][0])
