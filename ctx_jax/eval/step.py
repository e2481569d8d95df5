"""The jitted eval steps: loss and accuracy of one episode, no update.

`eval_step` leaves the partitioning to GSPMD; `sharded_eval_step` splits the
episode over the devices with `shard_map` as the sharded train step does
(`ctx_jax/training/sharded_step.py` explains the scheme). The model should be
in eval mode (batch norm from its EMA statistics, or from the support set for
episodic batch norm).
"""

import functools

from flax import nnx
import jax
from jax.sharding import PartitionSpec as P

from ctx_jax import mesh as mesh_lib
from ctx_jax.models import episode as episode_lib

Episode = episode_lib.Episode
AXIS = mesh_lib.DATA_AXIS


def check_episode(episode: Episode, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError unless every entry splits evenly over `mesh`."""
  if mesh.axis_names != (AXIS,):
    raise ValueError(f"the shard_map step needs the 1-D '{AXIS}' mesh of "
                     f"mesh.make_mesh, got axes {mesh.axis_names}")
  for key in episode_lib.MODEL_INPUT_KEYS:
    if key not in episode:
      raise KeyError(f"episode has no '{key}'")
    rows = episode[key].shape[0]
    if rows % mesh.size:
      raise ValueError(
          f"episode['{key}'] has {rows} rows, not divisible by the {mesh.size}"
          " devices of the mesh; pad episodes to a multiple of the device "
          "count (pipeline `pad_multiple`)")


def model_inputs(episode: Episode) -> Episode:
  """The entries the model reads (drops e.g. augmentation keys)."""
  return {key: episode[key] for key in episode_lib.MODEL_INPUT_KEYS}


@nnx.jit(static_argnames=("num_ways",))
def eval_step(model: nnx.Module, episode: Episode,
              num_ways: int) -> dict[str, jax.Array]:
  """Loss and accuracy of one episode; the model should be in eval mode."""
  logits = episode_lib.call_model(
      model, episode, episode_lib.logit_width(num_ways, episode))
  return episode_lib.masked_episode_metrics(
      logits, episode["query_labels"], episode["query_mask"])


@nnx.jit(static_argnames=("num_ways", "mesh"))
def sharded_eval_step(model: nnx.Module, episode: Episode, num_ways: int, *,
                      mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Loss and accuracy of one episode split over `mesh` (model in eval mode).

  The `shard_map` counterpart of `eval_step`: each device embeds
  its own rows, the head gathers the support set, and the metrics are means
  over all real queries of the episode (replicated scalars).
  """
  episode = model_inputs(episode)
  check_episode(episode, mesh)
  num_ways = episode_lib.logit_width(num_ways, episode)
  graphdef, state = nnx.split(model)

  def step(state, local_episode):
    local_model = nnx.merge(graphdef, state)
    logits = local_model(
        local_episode["support_images"], local_episode["support_labels"],
        local_episode["support_mask"], local_episode["query_images"],
        num_ways=num_ways, axis_name=AXIS)
    return episode_lib.masked_episode_metrics(
        logits, local_episode["query_labels"], local_episode["query_mask"],
        AXIS)

  return jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                       out_specs=P(), check_vma=True)(state, episode)


PARALLELISM = ("shard_map", "gspmd")


def select_eval_step(parallelism: str, mesh: jax.sharding.Mesh):
  """The eval step for `config.train.parallelism` ("shard_map" or "gspmd").

  Returns:
    `eval_fn(model, episode, num_ways)` -> metrics.
  """
  if parallelism == "shard_map":
    return functools.partial(sharded_eval_step, mesh=mesh)
  if parallelism == "gspmd":
    return eval_step
  raise ValueError(f"config.train.parallelism must be one of {PARALLELISM}, "
                   f"got {parallelism!r}")
