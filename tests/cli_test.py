"""The main jobs as a user runs them: ctx-train errors, ctx-demo end to end."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import fakes

BIN = pathlib.Path(sys.executable).parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def _run(args, cwd, timeout=600):
  return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True,
                        text=True, timeout=timeout, check=False)


def _train(tmp_path, *extra):
  return _run([str(BIN / "ctx-train"), "--config",
               str(pathlib.Path(__file__).parents[1] / "experiments" /
                   "demo.py") + ":smoke", *extra], cwd=tmp_path)


def test_unknown_config_key_is_an_error(tmp_path):
  proc = _train(tmp_path, "--workdir", str(tmp_path / "w"),
                "--config.optimizer.learning_rat=0.1")
  assert proc.returncode != 0
  assert "learning_rat" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_missing_data_dir_is_an_error(tmp_path):
  proc = _train(tmp_path, "--workdir", str(tmp_path / "w"),
                f"--config.data.records_root={tmp_path / 'nowhere'}")
  assert proc.returncode == 1
  assert "ctx-train: error:" in proc.stderr
  assert str(tmp_path / "nowhere" / "glyphs") in proc.stderr


def test_unwritable_workdir_is_an_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = _train(tmp_path, "--workdir", str(blocker / "w"))
  assert proc.returncode == 1
  assert "not writable" in proc.stderr
  assert blocker.read_text() == "not a directory"


def test_demo_main_job_end_to_end(tmp_path):
  data = fakes.make_tiny_demo(tmp_path / "data")
  proc = _run([str(BIN / "ctx-demo"), "--workdir", str(tmp_path / "demo"),
               "--data_dir", str(data), "--steps", "2",
               "--eval_episodes", "3"], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "chance 20.0%" in out
  for method in ("CTX", "ProtoNet", "pixel 1-NN"):
    assert method in out
  results = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
  assert set(results["test"]) == {"ctx", "protonet", "pixels"}
  for row in results["test"].values():
    assert row["num_episodes"] == 3 and 0 <= row["mean"] <= 1
  assert (tmp_path / "demo" / "ctx" / "export").is_dir()


def test_demo_over_seeds(tmp_path):
  # Two seeds per method (ProtoNet only, to stay fast): one run dir per seed,
  # the mean and spread over seeds in the table and demo_results.json.
  data = fakes.make_tiny_demo(tmp_path / "data")
  proc = _run([str(BIN / "ctx-demo"), "--workdir", str(tmp_path / "demo"),
               "--data_dir", str(data), "--steps", "2", "--eval_episodes",
               "3", "--methods", "protonet", "--seeds", "0,1"], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "over 2 training seeds" in proc.stdout
  results = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
  runs = results["test_per_seed"]["protonet"]
  assert set(runs) == {"0", "1"}
  accs = [r["mean"] for r in runs.values()]
  summary = results["over_seeds"]["protonet"]
  assert summary["num_seeds"] == 2
  assert abs(summary["mean"] - sum(accs) / 2) < 1e-12
  assert summary["min"] == min(accs) and summary["max"] == max(accs)
  for name in ("protonet", "protonet_seed1"):
    assert (tmp_path / "demo" / name / "results.json").is_file()
  # Different seeds: different initialisations and episode streams.
  cfg0 = json.loads((tmp_path / "demo" / "protonet" / "config.json")
                    .read_text())
  cfg1 = json.loads((tmp_path / "demo" / "protonet_seed1" / "config.json")
                    .read_text())
  assert (cfg0["seed"], cfg1["seed"]) == (0, 1)
