"""Device mesh, shardings and the host -> device hand-off of episodes.

One episode is split across all devices of all processes along its leading
(image) axis, as the official distributed learner splits support and query
sets into contiguous per-replica chunks. Parameters and optimizer state are
replicated. Under `jit`, batch-norm moments and the CTX attention over the
support set are then computed over the *global* episode, which is the official
synced semantics.
"""

import collections
from typing import Iterator, Mapping

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D data mesh over `num_devices` devices (default: all, all hosts)."""
  devices = jax.devices()
  if num_devices is not None and num_devices > 0:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} "
                       "devices are visible")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError("multi-process runs must use every device")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_episode(episode: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                  keys: tuple[str, ...]) -> dict[str, jax.Array]:
  """Places this process's part of an episode on the mesh.

  Args:
    episode: numpy arrays; each process passes the rows it owns (the whole
      episode in a single-process run).
    mesh: from `make_mesh`.
    keys: the entries to transfer; the rest (ids, counts) stay on the host.

  Returns:
    Global arrays sharded along their leading axis.
  """
  sharding = data_sharding(mesh)
  out = {}
  for key in keys:
    value = np.asarray(episode[key])
    if value.shape[0] % (mesh.size // jax.process_count()):
      raise ValueError(
          f"episode['{key}'] has {value.shape[0]} rows, not divisible by the "
          f"{mesh.size // jax.process_count()} local devices; pad episodes to "
          "a multiple of the device count (pipeline `pad_multiple`)")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def prefetch_to_mesh(iterator: Iterator[Mapping[str, np.ndarray]],
                     mesh: jax.sharding.Mesh, keys: tuple[str, ...],
                     size: int = 2) -> Iterator[tuple[dict, dict]]:
  """Yields `(device_episode, host_episode)` pairs, `size` transfers ahead.

  Transfers are asynchronous, so starting them `size` episodes early lets the
  copy of the next episode overlap the current step.
  """
  queue = collections.deque()
  for host in iterator:
    queue.append((shard_episode(host, mesh, keys), host))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
