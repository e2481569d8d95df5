"""tf.io.gfile, tf.data, epath, orbax and the episode pipeline on `gs://`.

Everything goes to the loopback Cloud Storage emulator of
tests/gcs_emulator.py, through TF's own GCS client (libcurl, TLS). The
checks run in one subprocess (tests/gcs_worker.py), whose environment is in
place before TF's GCS file system starts. Results are compared with local
reads, and what was written is checked through the emulator itself.
"""

import http.client
import json
import pathlib
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest
import tensorflow as tf

from tests import gcs_emulator
from tests import gcs_worker

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASS_FILE = gcs_worker.CLASS_FILE
CHECKS = ("gfile", "tfrecords", "orbax", "episodes", "train")


@pytest.fixture(scope="module")
def dtd(shared_dir):
  return shared_dir / "fixtures" / "md_records" / "dtd"


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.gcs_emulator() as emulator:
    yield emulator


@pytest.fixture(scope="module")
def worker(gcs, dtd, tmp_path_factory):
  """One worker process (one TF start-up) runs every check on the bucket.

  Returns a function giving a check's observations (failing the calling
  test with the worker's traceback when the check raised) and the folder of
  its arrays.
  """
  out = tmp_path_factory.mktemp("gcs_worker")
  gcs.upload_tree(dtd, "episodes")  # The source the episodes check reads.
  proc = subprocess.run(
      [sys.executable, "-m", "tests.gcs_worker", ",".join(CHECKS),
       gcs.url(), str(dtd), str(out)],
      env=gcs.env, cwd=REPO_ROOT, capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((out / "result.json").read_text())

  def result(check):
    if "error" in results[check]:
      pytest.fail(f"the {check} check raised in the worker:\n"
                  + results[check]["error"], pytrace=False)
    return results[check]
  return result, out


def test_gfile_operations(gcs, worker, dtd):
  result = worker[0]("gfile")
  data = (dtd / CLASS_FILE).read_bytes()
  assert result["whole_equal"] and result["part_equal"]
  assert result["size"] == len(data)
  assert result["exists"] == [True, True, False]
  assert result["isdir"] == [True, False]
  assert result["listdir"] == ["data.bin", "sub/"]
  assert result["glob"] == [gcs.url("gfile/dir/data.bin")]
  assert result["renamed_equal"] and not result["old_exists_after_rename"]
  assert not result["exists_after_rmtree"]
  # The emulator itself holds the bytes TF wrote, and nothing under dir/
  # ("gfile/" is the folder marker makedirs wrote).
  assert result["kept"] == ["copy.bin"]
  assert gcs.object_names("gfile/") == ["gfile/", "gfile/kept/copy.bin"]
  assert gcs.read_object("gfile/kept/copy.bin") == data


def test_tfrecord_dataset_reads_from_bucket(gcs, worker, dtd):
  assert worker[0]("tfrecords")["num_records"] > 1
  local = [r.numpy() for r in tf.data.TFRecordDataset(str(dtd / CLASS_FILE))]
  with np.load(worker[1] / "records.npz", allow_pickle=True) as got:
    assert list(got["records"]) == local
    assert sorted(got["interleaved"]) == sorted(local * 2)
  assert (gcs.read_object(f"tfrecords/{CLASS_FILE}")
          == (dtd / CLASS_FILE).read_bytes())


def test_orbax_checkpoint_manager_and_epath(gcs, worker):
  result = worker[0]("orbax")
  assert result["epath_text"] == "written by epath"
  assert result["epath_backend"] == "PosixGPath"  # gs:// through tf.io.gfile.
  assert result["steps"] == [2]  # max_to_keep=1 deleted step 1 in the bucket.
  with np.load(worker[1] / "restored.npz") as got:
    np.testing.assert_array_equal(got["w"], np.arange(6).reshape(2, 3) * 2)
    np.testing.assert_array_equal(got["c"], np.full(4, 2))
  names = gcs.object_names("orbax/ckpt/")
  assert any(n.startswith("orbax/ckpt/2/") for n in names)
  assert not any(n.startswith("orbax/ckpt/1/") for n in names)
  assert gcs.read_object("orbax/epath/note.txt") == b"written by epath"


def test_episodes_from_bucket_match_local(worker, dtd):
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  assert worker[0]("episodes")["num_episodes"] == 2
  # The same seed over the local copy gives the same episodes.
  local = list(mdp.make_one_source_episode_dataset(
      mdp.load_dataset_spec(dtd), "TEST",
      mdp.EpisodeDescriptionConfig(**gcs_worker.EPISODE), image_size=28,
      seed=gcs_worker.SEED).take(2).as_numpy_iterator())
  with np.load(worker[1] / "episodes.npz") as got:
    for i, ep in enumerate(local):
      for key, value in ep.items():
        np.testing.assert_array_equal(got[f"{i}.{key}"], value, err_msg=key)


def test_training_run_on_a_bucket(gcs, worker):
  # Records and work dir on the bucket: two steps, a third resumed from the
  # bucket's checkpoint, then the best export evaluated on the test split.
  result = worker[0]("train")
  assert result["eval_episodes"] == 3
  assert 0.0 <= result["eval_accuracy"] <= 1.0
  assert result["steps"] == [2, 3]
  assert result["best_arrays"] > 10
  assert len(result["model_key_state"]) == 64  # sha256 of the export's files
  names = set(gcs.object_names("train/run/"))
  for want in ("train/run/config.json", "train/run/results.json",
               "train/run/best/model_config.json",
               "train/run/best/valid.json",
               "train/run/export/model_config.json",
               "train/run/export/step.json"):
    assert want in names, want
  assert any(n.startswith("train/run/ckpt/3/") for n in names)
  assert any("/events.out.tfevents." in n for n in names)
  assert not any(".tmp" in n or ".old" in n for n in names)
  results = json.loads(gcs.read_object("train/run/results.json"))
  assert results["step"] == 3


def test_in_process_gfile_after_patch_environ(gcs, monkeypatch):
  gcs.patch_environ(monkeypatch)  # This process imported TF long ago.
  path = gcs.url("inproc/note.txt")
  with tf.io.gfile.GFile(path, "w") as f:
    f.write("in process")
  assert gcs.read_object("inproc/note.txt") == b"in process"
  gcs.client().bucket(gcs.bucket).blob("inproc/seeded.txt").upload_from_string(
      b"seeded")
  assert tf.io.gfile.listdir(gcs.url("inproc")) == ["note.txt", "seeded.txt"]
  with tf.io.gfile.GFile(gcs.url("inproc/seeded.txt"), "rb") as f:
    assert f.read() == b"seeded"


def test_emulator_listens_on_loopback_only_and_stops():
  with gcs_emulator.gcs_emulator() as emulator:
    addresses = [urllib.parse.urlsplit(u) for u in (
        emulator.env["HTTPS_PROXY"], emulator.emulator_url)]
    assert {a.hostname for a in addresses} == {"127.0.0.1"}
    for a in addresses:
      socket.create_connection((a.hostname, a.port), timeout=5).close()
    assert emulator.object_names() == []  # The bucket exists, empty.
  for a in addresses:
    with pytest.raises(ConnectionRefusedError):
      socket.create_connection((a.hostname, a.port), timeout=5)


def _get_through_proxy(emulator, path, byte_range=None):
  """One GET of `path` on the Google host, through the proxy's tunnel."""
  proxy = urllib.parse.urlsplit(emulator.env["HTTPS_PROXY"])
  context = ssl.create_default_context(cafile=emulator.env["CURL_CA_BUNDLE"])
  conn = http.client.HTTPSConnection(proxy.hostname, proxy.port,
                                     context=context, timeout=30)
  conn.set_tunnel(gcs_emulator.GOOGLE_HOSTS[1], 443)
  try:
    conn.request("GET", path, headers={
        "Authorization": "Bearer x", **({"Range": byte_range}
                                         if byte_range else {})})
    return conn.getresponse().read()
  finally:
    conn.close()


def test_injected_latency_and_bandwidth_and_request_counts():
  data = bytes(range(256)) * 1200  # 300 KB.
  with gcs_emulator.gcs_emulator(latency_s=0.2, bandwidth=1e6) as emulator:
    emulator.client().bucket(emulator.bucket).blob("o/x.bin") \
        .upload_from_string(data)
    start = time.monotonic()
    got = _get_through_proxy(emulator, f"/{emulator.bucket}/o/x.bin",
                             "bytes=1000-1099")
    small = time.monotonic() - start
    start = time.monotonic()
    whole = _get_through_proxy(emulator, f"/{emulator.bucket}/o/x.bin")
    large = time.monotonic() - start
    log = emulator.stats.log
  assert got == data[1000:1100] and whole == data
  assert small >= 0.2  # The latency, once.
  assert large >= 0.2 + 0.25  # Plus 300 KB at 1 MB/s.
  assert [(e[0], e[1], e[2], e[3]) for e in log] == [
      ("GET", f"/{gcs_emulator.BUCKET}/o/x.bin", "bytes=1000-1099", 100),
      ("GET", f"/{gcs_emulator.BUCKET}/o/x.bin", None, len(data))]
  assert len(emulator.stats.requests_for("o/x.bin")) == 2
