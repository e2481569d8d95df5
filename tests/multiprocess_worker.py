"""One process of the 2-process train-step test (tests/multiprocess_test.py).

Joins a loopback JAX cluster of CPU processes, builds the replicated train
state as `train.py` does, passes its own contiguous rows of a fixed episode
through `mesh.shard_episode` and runs the shard_map train step. Writes the
metrics of each step and its local copy of the final model state to an npz.

  python -m tests.multiprocess_worker --port 12345 --process_id 0 \
      --num_processes 2 --output /tmp/p0.npz
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

from flax import nnx  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def flat_state(model: nnx.Module) -> dict[str, np.ndarray]:
  """Model state as {keystr: array}, from this process's replica."""
  state = nnx.to_pure_dict(nnx.state(model))
  return {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def run(args) -> None:
  """Joins the cluster, runs the steps and writes the npz."""
  jax.config.update("jax_num_cpu_devices", args.devices_per_process)
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}",
      num_processes=args.num_processes, process_id=args.process_id,
      initialization_timeout=120)
  # Imported after initialize: nothing may touch a device before it.
  # pylint: disable=g-import-not-at-top
  from ctx_jax import mesh as mesh_lib
  from ctx_jax.data import input_pipeline
  from ctx_jax.models import episode as episode_lib
  from ctx_jax.training import sharded_step
  from ctx_jax.training import state as state_lib
  from tests import sharded_step_test as cases

  # pylint: enable=g-import-not-at-top

  assert jax.process_count() == args.num_processes
  config = cases.config_for(args.head)
  mesh = mesh_lib.make_mesh()
  model, optimizer = state_lib.create_train_state(config, mesh)
  episode = input_pipeline.local_rows(cases.make_episode(), jax.process_index(),
                                      jax.process_count())
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  results = {}
  with jax.set_mesh(mesh):
    model.train()
    for step in range(args.num_steps):
      metrics = sharded_step.train_step(model, optimizer, dev,
                                        cases.NUM_WAYS, cases.WEIGHT_DECAY,
                                        mesh=mesh)
      for key, value in metrics.items():
        results[f"metrics/{step}/{key}"] = np.asarray(
            value.addressable_data(0))
  for key, value in flat_state(model).items():
    results[f"state/{key}"] = value
  results["devices"] = np.asarray([mesh.size, jax.local_device_count()])
  np.savez(args.output, **results)
  jax.distributed.shutdown()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--head", default="ctx")
  parser.add_argument("--num_steps", type=int, default=2)
  parser.add_argument("--output", required=True)
  run(parser.parse_args())


if __name__ == "__main__":
  main()
