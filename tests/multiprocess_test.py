"""Two JAX processes on loopback run the shard_map step as one process does.

Each worker (tests/multiprocess_worker.py) holds 2 CPU devices and passes
only its own half of the episode's rows; the 4-device result must equal the
same step in this (single) process on a 4-device mesh.
"""

import os
import socket
import subprocess
import sys
import time

from flax import nnx
import jax
import numpy as np

from ctx_jax import mesh as mesh_lib
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import sharded_step
from ctx_jax.training import state as state_lib
from tests import sharded_step_test as cases

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
NUM_STEPS = 2
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, head, while_running):
  """Runs the workers and, meanwhile, `while_running()` here.

  Kills every worker still alive on failure or timeout.

  Returns:
    (the workers' npz contents, while_running's result).
  """
  port = _free_port()
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  outputs, procs, logs = [], [], []
  try:
    for i in range(NUM_PROCESSES):
      outputs.append(tmp_path / f"process_{i}.npz")
      logs.append(open(tmp_path / f"process_{i}.log", "w"))
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "tests.multiprocess_worker",
           "--port", str(port), "--process_id", str(i),
           "--num_processes", str(NUM_PROCESSES),
           "--devices_per_process", str(DEVICES_PER_PROCESS),
           "--head", head, "--num_steps", str(NUM_STEPS),
           "--output", str(outputs[-1])],
          env=env, cwd=cases.__file__.rsplit("/tests/", 1)[0],
          stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.time() + TIMEOUT_S
    result = while_running()
    for proc in procs:
      proc.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    for log in logs:
      log.close()
  for i, proc in enumerate(procs):
    text = (tmp_path / f"process_{i}.log").read_text()
    assert proc.returncode == 0, f"worker {i} failed:\n{text[-3000:]}"
  return [dict(np.load(path)) for path in outputs], result


def _single_process(head):
  """The same steps in this process on a 4-device mesh."""
  config = cases.config_for(head)
  mesh = mesh_lib.make_mesh(NUM_PROCESSES * DEVICES_PER_PROCESS)
  model, optimizer = state_lib.create_train_state(config, mesh)
  dev = mesh_lib.shard_episode(cases.make_episode(), mesh,
                               episode_lib.MODEL_INPUT_KEYS)
  results = {}
  with jax.set_mesh(mesh):
    model.train()
    for step in range(NUM_STEPS):
      metrics = sharded_step.train_step(model, optimizer, dev, cases.NUM_WAYS,
                                        cases.WEIGHT_DECAY, mesh=mesh)
      for key, value in jax.device_get(metrics).items():
        results[f"metrics/{step}/{key}"] = np.asarray(value)
  state = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    results[f"state/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return results, config


def test_two_processes_match_one_process(tmp_path):
  workers, (expected, config) = _run_workers(
      tmp_path, "ctx", lambda: _single_process("ctx"))
  for i, result in enumerate(workers):
    np.testing.assert_array_equal(
        result.pop("devices"),
        [NUM_PROCESSES * DEVICES_PER_PROCESS, DEVICES_PER_PROCESS])
    assert set(result) == set(expected), i
  # Both processes hold identical replicas.
  for key in expected:
    np.testing.assert_array_equal(workers[0][key], workers[1][key],
                                  err_msg=key)
  assert expected["metrics/0/num_queries"] == 5
  atol = cases.PARAM_ATOL_IN_STEPS * config.optimizer.learning_rate
  for key, value in expected.items():
    got = workers[0][key]
    if key.startswith("metrics/"):
      np.testing.assert_allclose(got, value, rtol=cases.METRIC_RTOL,
                                 atol=1e-7, err_msg=key)
    elif "_ema" in key:
      np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6,
                                 err_msg=key)
    else:
      np.testing.assert_allclose(got, value, rtol=0, atol=atol, err_msg=key)
