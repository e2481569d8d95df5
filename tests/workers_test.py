"""Episodes prepared by worker processes (`meta_dataset_pipeline.workers`).

Episode i must be bit-identical whatever the number of workers K and of
processes (row blocks), with host augmentation, SimCLR episodes, on-device
augmentation fields and resume; a worker that dies or meets bad data ends
the stream with one clear error, and nothing hangs.
"""

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from ctx_jax.data import input_pipeline
from meta_dataset_pipeline import cli
from meta_dataset_pipeline import decoder
from meta_dataset_pipeline import pipeline
from meta_dataset_pipeline import reader
from meta_dataset_pipeline import record_files
from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline import workers
import meta_dataset_pipeline as mdp
from tests import pipeline_stream_test as stream_cases

SIZE = 24
# The stream tests' small variable episodes with flushes, half of them
# SimCLR episodes; ordinary ones are also BOHB-augmented below: every random
# op of the episode map runs.
CFG = stream_cases.CFG
NOISE = stream_cases.NOISE
NUM = 10


@pytest.fixture(scope="module")
def specs(shared_dir):
  root = shared_dir / "fixtures" / "md_records"
  return [mdp.load_dataset_spec(root / s) for s in ("omniglot", "dtd")]


def _digest(ep):
  h = hashlib.sha256()
  for key in sorted(ep):
    a = np.asarray(ep[key])
    h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _episodes(specs, num_workers, num=NUM, **kwargs):
  options = dict(seed=5, support_augmentation=NOISE,
                 md_augmentation=mdp.BOHB_AUGMENTATION)
  options.update(kwargs)
  it = pipeline.make_episode_iterator(specs, "TRAIN", CFG, SIZE,
                                      num_workers=num_workers, **options)
  try:
    return [dict(ep) for ep in itertools.islice(it, num)]
  finally:
    if hasattr(it, "close"):
      it.close()


def test_same_episodes_for_any_number_of_workers_and_processes(specs):
  whole = _episodes(specs, 0)
  want = [_digest(ep) for ep in whole]
  assert len(set(want)) == NUM
  assert {bool(np.any(ep["query_labels"][ep["query_mask"]] >= 6))
          for ep in whole} == {True, False}  # SimCLR and ordinary ones.
  assert len({int(ep["source_id"]) for ep in whole}) == 2
  for k in (1, 2, 3):
    got = _episodes(specs, k)
    assert [_digest(ep) for ep in got] == want, f"num_workers={k}"
    assert set(got[0]) == set(whole[0])
    for key in whole[0]:
      assert np.asarray(got[0][key]).dtype == np.asarray(whole[0][key]).dtype
  # Two processes: each reads its own row block with its own workers; the
  # blocks are exactly the rows of the one-process episode.
  blocks = [_episodes(specs, 2, pad_multiple=4, row_block=(b, 2))
            for b in range(2)]
  padded = _episodes(specs, 0, pad_multiple=4)
  for i, ep in enumerate(padded):
    for b in range(2):
      assert (_digest(blocks[b][i]) ==
              _digest(input_pipeline.local_rows(ep, b, 2))), (i, b)


def test_resume_and_device_augmentation_with_workers(specs):
  kwargs = dict(augment_on_device=True, pad_multiple=2)
  whole = [_digest(ep) for ep in _episodes(specs, 0, num=7, **kwargs)]
  resumed = _episodes(specs, 2, num=3, start_episode=4, **kwargs)
  assert any(k.endswith("aug_seeds") for k in resumed[0])
  assert [_digest(ep) for ep in resumed] == whole[4:]


def test_views_are_given_back_and_reused(specs):
  it = pipeline.make_episode_iterator(specs, "TRAIN", CFG, SIZE,
                                      num_workers=1, seed=1)
  try:
    held = next(it)
    images = held["support_images"]
    before = images.copy()
    # The held episode's memory is not lent again while it is referenced.
    for ep in itertools.islice(it, 6):
      del ep
    np.testing.assert_array_equal(images, before)
    names = set(it._segments._all)  # pylint: disable=protected-access
    del held, images
    for ep in itertools.islice(it, 6):
      del ep
    # Segments are reused, not created per episode.
    segments = it._segments._all  # pylint: disable=protected-access
    assert len(segments) <= len(names) + 1
  finally:
    it.close()
  assert not it._segments._all  # pylint: disable=protected-access


def _copy(specs, tmp_path):
  target = tmp_path / "dtd"
  shutil.copytree(specs[1].path, target)
  for path in target.iterdir():
    path.chmod(0o644)
  return target


def test_corrupt_record_met_by_a_worker(specs, tmp_path):
  target = _copy(specs, tmp_path)
  path = target / "41.tfrecords"
  data = bytearray(path.read_bytes())
  for offset in reader.index_records(str(path)):
    data[offset + 20] ^= 0xFF
  path.write_bytes(bytes(data))
  spec = mdp.load_dataset_spec(target)
  every_class = mdp.EpisodeDescriptionConfig(num_ways=7, num_support=2,
                                             num_query=2)
  msg = r"41\.tfrecords: record \d+ \(byte \d+\) of class 41 is corrupt"
  with pytest.raises(tf.errors.OpError, match=msg) as in_process:
    list(itertools.islice(pipeline.make_episode_iterator(
        spec, "TEST", every_class, SIZE, num_workers=0), 1))
  start = time.monotonic()
  it = pipeline.make_episode_iterator(spec, "TEST", every_class, SIZE,
                                      num_workers=2)
  procs = list(it._procs)  # pylint: disable=protected-access
  with pytest.raises(mdp.RecordError, match=msg) as e:
    next(it)
  assert "\n" not in str(e.value)
  # The commands' one-line error is the same message either way (tf.data
  # wraps the generator's traceback; `one_line` keeps the error's line).
  assert cli.one_line(in_process.value) == cli.one_line(e.value)
  assert all(p.exitcode is not None for p in procs)  # All stopped.
  assert time.monotonic() - start < 120


def test_image_that_fails_to_decode_in_a_worker(specs, tmp_path):
  target = _copy(specs, tmp_path)
  path = target / "43.tfrecords"
  rng = np.random.default_rng(0)
  framed = []
  with open(path, "rb") as f:
    for offset in reader.index_records(str(path)):
      image, label = decoder.parse_record(
          record_files.read_record(f, int(offset)))
      # Scramble the entropy-coded data, keep the headers and the end
      # marker: the reader's checks pass, TF's decoder fails.
      body = image.index(b"\xff\xda") + 20
      noise = rng.integers(0, 256, len(image) - body - 2, dtype=np.uint8)
      framed.append(records_writer.tfrecord_frame(
          records_writer.serialize_example(
              image[:body] + noise.tobytes() + image[-2:], label)))
  path.write_bytes(b"".join(framed))
  spec = mdp.load_dataset_spec(target)
  every_class = mdp.EpisodeDescriptionConfig(num_ways=7, num_support=2,
                                             num_query=2)
  it = pipeline.make_episode_iterator(spec, "TEST", every_class, SIZE,
                                      num_workers=1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"43\.tfrecords: record \d+ of class 43: the "
                     r"image failed to decode"):
    next(it)


def test_killed_worker_ends_the_stream(specs):
  it = pipeline.make_episode_iterator(specs, "TRAIN", CFG, SIZE,
                                      num_workers=2, seed=2)
  next(it)
  victim = it._procs[1]  # pylint: disable=protected-access
  os.kill(victim.pid, signal.SIGKILL)
  start = time.monotonic()
  with pytest.raises(workers.WorkerError,
                     match=r"episode worker 1 \(pid \d+\) was killed by "
                     r"signal 9 while episode \d+ was being prepared"):
    for _ in range(50):
      next(it)
  assert time.monotonic() - start < 30
  assert all(p.exitcode is not None
             for p in it._procs)  # pylint: disable=protected-access


def test_default_num_workers():
  assert workers.default_num_workers(2) == 0
  assert workers.default_num_workers(16) == 15
  assert workers.default_num_workers(96, processes_per_host=8) == 11
  assert workers.default_num_workers(4, processes_per_host=2) == 0
  assert workers.default_num_workers() >= 0


def test_workers_refuse_the_decoded_cache(specs):
  with pytest.raises(ValueError, match="num_workers=0"):
    pipeline.make_episode_iterator(specs, "TRAIN", CFG, SIZE, num_workers=1,
                                   decoded_cache_bytes=1 << 30)


# Run as a process of the two-process test below: prints the digests of
# its row block of the first episodes, read through the config path.
_PROCESS_SCRIPT = """
import hashlib, itertools, json, sys
import numpy as np
from experiments import common
from ctx_jax.data import input_pipeline
root = sys.argv[1]
workers, index, count = (int(x) for x in sys.argv[2:5])
config = common.get_base_config()
config.data.records_root = root
config.data.image_size = 24
config.data.num_workers = workers
config.data.md_augmentation = "bohb"
config.data.train_episode = common.episode_config(
    max_ways_upper_bound=6, max_support_set_size=20, max_num_query=3,
    simclr_episode_fraction=0.5)
stream = input_pipeline.episodes(config, "TRAIN", ("omniglot", "dtd"),
                                 seed=4, pad_multiple=4, process_index=index,
                                 process_count=count)
out = []
for ep in itertools.islice(stream, 6):
  if count == 1:
    ep = [input_pipeline.local_rows(ep, b, 2) for b in range(2)]
  else:
    ep = [ep]
  digests = []
  for part in ep:
    h = hashlib.sha256()
    for key in sorted(part):
      a = np.asarray(part[key])
      h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
    digests.append(h.hexdigest())
  out.append(digests)
stream.close()
print(json.dumps(out))
"""


def test_two_processes_with_workers_read_the_one_process_episodes(
    shared_dir):
  """Two OS processes, each with 2 workers of its own, through the config
  path (`input_pipeline.episodes`): their row blocks are the blocks of the
  one-process, in-process episodes."""
  root = str(shared_dir / "fixtures" / "md_records")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def start(workers, index, count):
    return subprocess.Popen(
        [sys.executable, "-c", _PROCESS_SCRIPT, root, str(workers),
         str(index), str(count)], cwd=repo, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  procs = [start(0, 0, 1), start(2, 0, 2), start(2, 1, 2)]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  whole, first, second = outs
  assert [d[0] for d in first] == [d[0] for d in whole]
  assert [d[0] for d in second] == [d[1] for d in whole]


def test_script_without_main_guard(shared_dir, tmp_path):
  """`spawn` would re-run an unguarded script in every worker (which would
  start the pipeline again there); the workers must not."""
  script = tmp_path / "unguarded.py"
  script.write_text(
      "import meta_dataset_pipeline as mdp\n"
      "print('script body ran', flush=True)\n"
      f"spec = mdp.load_dataset_spec({str(shared_dir)!r} + "
      "'/fixtures/md_records/dtd')\n"
      "it = mdp.make_episode_iterator(spec, 'TRAIN', "
      "mdp.EpisodeDescriptionConfig(), 16, num_workers=2)\n"
      "print(int(next(it)['num_ways']) > 0, flush=True)\n"
      "it.close()\n")
  res = subprocess.run([sys.executable, str(script)], capture_output=True,
                       text=True, timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.split() == ["script", "body", "ran", "True"]
  assert "Traceback" not in res.stderr
