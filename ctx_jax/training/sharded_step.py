"""Train and eval steps that split an episode over devices with `shard_map`.

These are the explicit-collective counterparts of `train_step.train_step` and
`eval.step.eval_step` (which leave the partitioning to GSPMD; the sharded
eval step is `eval.step.sharded_eval_step`), and follow
the official distributed learner (shared/ALIGNMENT.md, "Distributed mode"):

* the episode's support and query sets are each cut into contiguous chunks,
  one per device of the 1-D `data` mesh (all devices of all processes), and
  each device embeds only its own chunk;
* batch norm is synced: the masked sum(x), sum(x^2) and count of the support
  rows are summed over the mesh, so every device normalises its rows with,
  and updates its EMA from, the moments of the whole support set;
* the CTX head all-gathers the projected support keys and values, labels and
  mask, so every device attends over the whole support set while its queries
  stay local (ProtoNet gathers the pooled support embeddings);
* the loss is the mean cross-entropy over all real queries of the episode
  plus the regulariser once; gradients are summed over devices (the
  transpose of the collectives above, see below), so the normalised-GD
  global norm is that of the reduced gradient;
* parameters, optimizer state and EMA statistics are replicated and stay
  identical on every device.

Gradients: `shard_map` runs with `check_vma=True`, so JAX tracks which values
differ across devices. The loss built above is device-invariant, and the
replicated parameters enter device-varying computations through implicit
`pvary`s whose transpose is a `psum`: differentiating the invariant loss
inside the shard_map therefore yields the already-reduced (invariant)
gradient of the episode loss, with no explicit gradient all-reduce and no
double counting (the equivalence tests in tests/sharded_step_test.py compare
against one device and against the GSPMD step).

The episode's leading axes must be divisible by the number of devices (the
pipeline's `pad_multiple`; `mesh.shard_episode` checks it). Shape letters as
in `ctx_jax/models/episode.py`.
"""

import functools

from flax import nnx
import jax
from jax.sharding import PartitionSpec as P

from ctx_jax import mesh as mesh_lib
from ctx_jax.eval import step as eval_step_lib
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import train_step as step_lib

Episode = episode_lib.Episode
AXIS = mesh_lib.DATA_AXIS


def _loss_and_grads(model: nnx.Module, local_episode: Episode, num_ways: int,
                    weight_decay: float):
  """Inside the shard_map: ((total_loss, metrics), reduced grads)."""
  grad_fn = nnx.value_and_grad(step_lib.episode_loss, has_aux=True)
  return grad_fn(model, local_episode, num_ways, weight_decay, AXIS)


@nnx.jit(static_argnames=("num_ways", "weight_decay", "mesh"),
         donate_argnames=("model", "optimizer"))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, episode: Episode,
               num_ways: int, weight_decay: float, *,
               mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """One optimisation step on one episode split over the devices of `mesh`.

  Same updates and metrics as `train_step.train_step`.

  Args:
    model: the few-shot model, in train mode; updated in place (parameters
      and batch-norm EMA statistics, from the global support moments).
    optimizer: `nnx.Optimizer` over the model's `nnx.Param`s; updated in place.
    episode: global arrays (`mesh.shard_episode`); their leading axes must be
      divisible by `mesh.size`. Each device gets a contiguous chunk of rows.
    num_ways: static width of the logits.
    weight_decay: L2 coefficient.
    mesh: the 1-D `data` mesh (`mesh.make_mesh`), all devices of all
      processes.

  Returns:
    Scalar metrics (replicated): loss, total_loss, accuracy, regularizer,
    grad_norm, param_norm, update_norm, num_queries.
  """
  episode = eval_step_lib.model_inputs(episode)
  eval_step_lib.check_episode(episode, mesh)
  num_ways = episode_lib.logit_width(num_ways, episode)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, local_episode):
    local_model, local_optimizer = nnx.merge(graphdef, state)
    (total_loss, metrics), grads = _loss_and_grads(
        local_model, local_episode, num_ways, weight_decay)
    metrics = step_lib.apply_update(local_model, local_optimizer, grads,
                                    total_loss, metrics)
    return nnx.state((local_model, local_optimizer)), metrics

  new_state, metrics = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
      check_vma=True)(state, episode)
  nnx.update((model, optimizer), new_state)
  return metrics


@nnx.jit(static_argnames=("num_ways", "weight_decay", "mesh"))
def loss_and_grads(model: nnx.Module, episode: Episode, num_ways: int,
                   weight_decay: float, *, mesh: jax.sharding.Mesh):
  """The train step's loss, metrics and reduced gradients; no update.

  For tests and benchmarks. The model is left unchanged (its batch-norm EMA
  statistics included).

  Returns:
    (total_loss, metrics, grads), all replicated; grads is a pure dict shaped
    like `nnx.to_pure_dict(nnx.state(model, nnx.Param))`.
  """
  episode = eval_step_lib.model_inputs(episode)
  eval_step_lib.check_episode(episode, mesh)
  num_ways = episode_lib.logit_width(num_ways, episode)
  graphdef, state = nnx.split(model)

  def step(state, local_episode):
    local_model = nnx.merge(graphdef, state)
    (total_loss, metrics), grads = _loss_and_grads(
        local_model, local_episode, num_ways, weight_decay)
    return total_loss, metrics, nnx.to_pure_dict(grads)

  return jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                       out_specs=P(), check_vma=True)(state, episode)


def select_steps(parallelism: str, mesh: jax.sharding.Mesh):
  """The train and eval steps for `config.train.parallelism`.

  Args:
    parallelism: "shard_map" (this module) or "gspmd" (`train_step.py`).
    mesh: the 1-D `data` mesh the episodes are placed on.

  Returns:
    (train_fn, eval_fn) with the signatures of `train_step.train_step`
    `(model, optimizer, episode, num_ways, weight_decay)` and
    `eval.step.eval_step` `(model, episode, num_ways)`.
  """
  eval_fn = eval_step_lib.select_eval_step(parallelism, mesh)
  if parallelism == "shard_map":
    return functools.partial(train_step, mesh=mesh), eval_fn
  return step_lib.train_step, eval_fn
