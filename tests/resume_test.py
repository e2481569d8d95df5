"""Preemption and crashes: SIGTERM saves and stops, SIGKILL loses nothing
committed, resume reaches the uninterrupted run's parameters, NaN stops
before a bad checkpoint, and the best-on-validation export."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
from flax import nnx
import jax
import pytest

from ctx_jax.checkpoints import export
from ctx_jax.checkpoints import train_state
from ctx_jax.training import preemption
from ctx_jax.training import train
from ctx_jax.training import workdir as workdir_lib
from experiments import demo
from tests import fakes

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 16
OVERRIDES = {  # Shared by the in-process and the command-line runs.
    "train.num_steps": NUM_STEPS, "train.checkpoint_every": 3,
    "train.log_every": 1, "num_devices": 2, "eval.num_episodes": 2,
    "model.query_dim": 8, "model.val_dim": 8,
}


def _config(records_root, **extra):
  config = demo.get_config("smoke")
  config.data.records_root = str(records_root)
  for key, value in {**OVERRIDES, **extra}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _start(records_root, workdir, **extra):
  """ctx-train in a child process with 2 CPU devices; returns the Popen."""
  flags = [f"--config.{k}={v}" for k, v in {
      **OVERRIDES, "data.records_root": records_root, "train.valid_every": 0,
      **extra}.items()]
  # 8 host devices as in this process (conftest), of which the run uses 2:
  # XLA:CPU's Eigen convolutions split their work by the client's device
  # count, so a 2-device client rounds differently from an 8-device one.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=str(REPO))
  return subprocess.Popen(
      [sys.executable, "-m", "ctx_jax.main", "--config",
       f"{REPO / 'experiments' / 'demo.py'}:smoke", "--workdir",
       str(workdir), *flags], env=env, cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _steps(workdir):
  """Finalized checkpoint steps (orbax renames a checkpoint when done)."""
  ckpt = workdir / "ckpt"
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _wait_for_checkpoint_after(proc, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(s > step for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"ctx-train ended early ({proc.returncode}):\n{out}\n{err}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail("no checkpoint appeared")


def _params(export_dir):
  model, _ = export.load_exported_model(export_dir)
  return nnx.to_pure_dict(jax.device_get(nnx.state(model)))


def test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run(
    tmp_path):
  data = fakes.make_tiny_demo(tmp_path / "data")
  root = data.parent

  # 1. SIGTERM: checkpoint at the current step, exit 143, no export.
  killed = tmp_path / "killed"
  proc = _start(root, killed)
  _wait_for_checkpoint_after(proc, killed, 0)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, err
  assert "preempted (SIGTERM) at step" in err
  stopped = int(err.split("at step ")[1].split(";")[0])
  assert _steps(killed)[-1] == stopped < NUM_STEPS
  assert not (killed / workdir_lib.EXPORT_DIR).exists()

  # 2. Resume, then SIGKILL after the next checkpoint: no clean-up at all.
  proc = _start(root, killed)
  _wait_for_checkpoint_after(proc, killed, stopped)
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert _steps(killed)[-1] < NUM_STEPS

  # 3. Resume to the end, in this process.
  train.train_and_evaluate(_config(root, **{"train.valid_every": 0}),
                           str(killed))

  # The same seed uninterrupted, in this process; validation runs here (it
  # must not perturb training) and keeps the best export.
  reference = tmp_path / "reference"
  results = train.train_and_evaluate(
      _config(root, **{"train.valid_every": 4,
                       "train.num_valid_episodes": 2}), str(reference))

  got, want = _params(killed / "export"), _params(reference / "export")
  assert len(jax.tree.leaves(want)) > 10
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  # And training did move the parameters.
  assert json.loads((reference / "export" / "step.json").read_text()) == {
      "step": NUM_STEPS}

  # Best-on-validation export, consistent with the results file.
  best = json.loads((reference / workdir_lib.BEST_DIR / workdir_lib.BEST_FILE)
                    .read_text())
  assert best["step"] in (4, 8, 12, 16)
  assert results["best_valid"] == {"step": best["step"],
                                   "accuracy": best["accuracy"]}
  assert (reference / workdir_lib.BEST_DIR /
          export.MODEL_CONFIG_FILE).is_file()
  export.load_exported_model(reference / workdir_lib.BEST_DIR)

  # A half-written checkpoint (a kill during a save) is never resumed from.
  junk = reference / "ckpt" / f"{NUM_STEPS + 5}.orbax-checkpoint-tmp-1"
  junk.mkdir()
  (junk / "garbage").write_text("x")
  ckpt = train_state.TrainCheckpointer(reference, 3)
  assert ckpt.latest_step() == NUM_STEPS
  ckpt.close()

  # NaN guard: a diverging continuation stops before saving, and the last
  # good checkpoint stays the latest.
  diverge = _config(root, **{"train.valid_every": 0,
                             "train.num_steps": NUM_STEPS + 3,
                             "optimizer.learning_rate": float("nan")})
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    train.train_and_evaluate(diverge, str(reference))
  assert _steps(reference)[-1] == NUM_STEPS


def test_resume_with_another_seed_is_refused(tmp_path):
  data = fakes.make_tiny_demo(tmp_path / "data")
  config = _config(data.parent, **{"train.num_steps": 1,
                                   "train.valid_every": 0,
                                   "num_devices": 1})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  config.seed = 1
  config.train.num_steps = 2
  with pytest.raises(ValueError, match="seed=0"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
