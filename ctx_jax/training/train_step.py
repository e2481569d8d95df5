"""The jitted (GSPMD) train step and the episode loss. No TensorFlow here.

Episodes, logits and the masked metrics are described in
`ctx_jax/models/episode.py`; the eval steps are in `ctx_jax/eval/step.py`.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from ctx_jax import models
from ctx_jax.models import episode as episode_lib

Episode = episode_lib.Episode


def episode_loss(model: nnx.Module, episode: Episode, num_ways: int,
                 weight_decay: float, axis_name: str | None = None):
  """Official training loss: mean query cross-entropy + L2 on conv kernels.

  The regulariser is `weight_decay * sum(w**2)` (Keras L2, no factor 1/2) over
  every conv kernel of the backbone and the transformer; batch-norm parameters
  are not decayed. With `axis_name` (under `shard_map`, `episode` holding this
  device's rows) the cross-entropy is the mean over the real queries of the
  whole episode and the loss is the same on every device; the regulariser is
  added once.
  """
  logits = episode_lib.call_model(model, episode, num_ways, axis_name)
  metrics = episode_lib.masked_episode_metrics(
      logits, episode["query_labels"], episode["query_mask"], axis_name)
  regularizer = weight_decay * models.weight_decay_sum(model)
  metrics["regularizer"] = regularizer
  return metrics["loss"] + regularizer, metrics


def _global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(tree)


def apply_update(model: nnx.Module, optimizer: nnx.Optimizer, grads: Any,
                 total_loss: jax.Array, metrics: dict[str, jax.Array]
                 ) -> dict[str, jax.Array]:
  """Applies `grads` in place and adds the norm metrics to `metrics`.

  Shared by the GSPMD and the `shard_map` train steps (there `grads` is
  already reduced over the devices).

  Returns:
    `metrics` with total_loss, grad_norm, param_norm and update_norm added.
  """
  # Values, not the Variables: the update below mutates those in place.
  params_before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  params_after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  metrics["total_loss"] = total_loss
  metrics["grad_norm"] = _global_norm(grads)
  metrics["param_norm"] = _global_norm(params_after)
  metrics["update_norm"] = _global_norm(
      jax.tree.map(jnp.subtract, params_after, params_before))
  return metrics


@nnx.jit(static_argnames=("num_ways", "weight_decay"),
         donate_argnames=("model", "optimizer"))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, episode: Episode,
               num_ways: int, weight_decay: float) -> dict[str, jax.Array]:
  """One optimisation step on one episode (train-mode batch norm).

  Args:
    model: the few-shot model, in train mode; updated in place (parameters and
      batch-norm EMA statistics).
    optimizer: `nnx.Optimizer` over the model's `nnx.Param`s; updated in place.
    episode: the (possibly padded, possibly sharded) episode.
    num_ways: static width of the logits (the config's maximum ways).
    weight_decay: L2 coefficient.

  Returns:
    Scalar metrics: loss, total_loss, accuracy, regularizer, grad_norm,
    param_norm, update_norm, num_queries.
  """
  grad_fn = nnx.value_and_grad(episode_loss, has_aux=True)
  (total_loss, metrics), grads = grad_fn(
      model, episode, episode_lib.logit_width(num_ways, episode),
      weight_decay)
  return apply_update(model, optimizer, grads, total_loss, metrics)
