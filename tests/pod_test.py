"""Pod-ready runs (issue 22): one compilation cache for all processes, and
one process's failure stopping them all. 2 ctx-train processes on loopback,
1 CPU device each, on the tiny demo records."""

import pathlib
import shutil
import struct
import subprocess
import sys
import time

import pytest

from ctx_jax import distributed
from launch import local
from tests import fakes
from tests.launch_test import DEMO_SMOKE
from tests.launch_test import ENV
from tests.launch_test import REPO

TIMEOUT_S = 400


def _train_args(records_root, workdir, num_steps, *extra):
  return [sys.executable, "-m", "ctx_jax.main", "--config", DEMO_SMOKE,
          f"--config.data.records_root={records_root}", "--workdir",
          str(workdir), f"--config.train.num_steps={num_steps}",
          "--config.train.log_every=1", "--config.train.valid_every=0",
          "--config.eval.num_episodes=2", *extra]


def _run_two(commands, timeout=TIMEOUT_S):
  """Runs command i as process i of 2 (no supervisor: each process must
  stop by itself). Returns [(status, output, seconds)]."""
  envs = local.process_envs(local.make_parser().parse_args(
      ["--num_processes", "2", "--platform", "cpu", "--cpu_devices", "1"]))
  procs, start = [], time.time()
  for env, command in zip(envs, commands):
    procs.append(subprocess.Popen(
        command, env=dict(ENV, **env), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  results = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=max(timeout - (time.time() - start),
                                            1))
      results.append((proc.returncode, out, time.time() - start))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return results


def _compiled(output):
  lines = [l for l in output.splitlines() if ": compiled " in l]
  assert len(lines) == 1, output[-3000:]
  return int(lines[0].split(": compiled ")[1].split()[0]), lines[0]


def test_restarted_two_process_run_compiles_nothing(tmp_path):
  """The default cache of a multi-process run is in its work dir: process 0
  writes it, both read it, so a restart compiles nothing in either."""
  data = fakes.make_tiny_demo(tmp_path / "data")
  workdir = tmp_path / "run"
  runs = []
  for steps in (2, 4):  # A fresh start, then a restart (resume).
    results = _run_two([_train_args(data.parent, workdir, steps)] * 2)
    for status, out, _ in results:
      assert status == 0, out[-4000:]
    runs.append([_compiled(out) for _, out, _ in results])
  assert (workdir / "compilation_cache").is_dir()
  assert runs[0][0][0] > 0  # The first run compiled.
  for run in runs[1:]:
    for count, line in run:
      assert count == 0, line


def _corrupt_records(folder: pathlib.Path) -> None:
  """Flips a byte in the middle of every record's data (CRC mismatch)."""
  for path in folder.glob("*.tfrecords"):
    buf = bytearray(path.read_bytes())
    offset = 0
    while offset < len(buf):
      (length,) = struct.unpack("<Q", buf[offset:offset + 8])
      buf[offset + 12 + length // 2] ^= 0xFF
      offset += 12 + length + 4
    path.write_bytes(bytes(buf))


def test_a_corrupt_record_in_one_process_stops_both(tmp_path):
  """Only process 1 reads corrupt records (its own copy of the data, same
  specs: same episodes): both processes exit 1 within 60 s, printing the
  same line naming process 1, the file and the record."""
  data = fakes.make_tiny_demo(tmp_path / "data")
  bad = tmp_path / "bad" / data.name
  shutil.copytree(data, bad)
  _corrupt_records(bad)
  results = _run_two([
      _train_args(data.parent, tmp_path / "run", 20),
      _train_args(bad.parent, tmp_path / "run", 20)])
  lines = []
  for status, out, seconds in results:
    assert status == 1, out[-4000:]
    errors = [l for l in out.splitlines() if l.startswith("ctx-train: error")]
    assert len(errors) == 1, out[-4000:]
    lines.append(errors[0])
  assert lines[0] == lines[1]
  assert lines[0].startswith("ctx-train: error: process 1: ")
  assert str(bad) in lines[0] and "record" in lines[0]
  assert "Traceback" not in results[0][1]
  # Within 60 s of each other (the failing one ends first).
  assert abs(results[0][2] - results[1][2]) < 60


def test_processes_that_disagree_stop_before_building_the_episode(tmp_path):
  data = fakes.make_tiny_demo(tmp_path / "data")
  results = _run_two([
      _train_args(data.parent, tmp_path / "run", 20),
      _train_args(data.parent, tmp_path / "run", 20, "--config.seed=1")])
  lines = []
  for status, out, _ in results:
    assert status == 1, out[-4000:]
    lines += [l for l in out.splitlines() if l.startswith("ctx-train: error")]
  assert len(lines) == 2 and lines[0] == lines[1], lines
  assert "processes disagree" in lines[0] and "episode 0 seed 0" in lines[0]
  assert "seed 1" in lines[0]


def test_single_process_helpers_change_nothing():
  # Single process: the configured folder or the per-user default.
  assert distributed.compilation_cache_dir("", "gs://b/run") == ""
  assert distributed.compilation_cache_dir("/c", "gs://b/run") == "/c"
  assert distributed.compilation_cache_dir("none", None) == "none"
  episodes = [{"support_mask": [1], "query_mask": [1]}] * 3
  assert list(distributed.check_agreement(iter(episodes), "t", 0)) == episodes
  with pytest.raises(ValueError, match="bad"):
    with distributed.fail_together("prog"):
      raise ValueError("bad")


def test_error_message_finds_the_pipeline_error_inside_a_tf_error():

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  wrapped = tf.errors.InvalidArgumentError(
      None, None,
      "{{function_node __wrapped__IteratorGetNext}} RecordError: "
      "/r/0.tfrecords: record 10\nTraceback (most recent call "
      "last):\n  File \"x.py\", line 1\n\n"
      "meta_dataset_pipeline.record_files.RecordError: "
      "/r/0.tfrecords: record 10 (byte 9060) of class 0 is corrupt:"
      " data CRC mismatch\n\n\t [[{{node PyFunc}}]]")
  assert distributed.error_message(wrapped) == (
      "/r/0.tfrecords: record 10 (byte 9060) of class 0 is corrupt: data CRC "
      "mismatch")
  assert distributed.error_message(ValueError("x.tfrecords: record 3")) == (
      "x.tfrecords: record 3")
  assert distributed.error_message(RuntimeError("boom")) == (
      "RuntimeError: boom")
