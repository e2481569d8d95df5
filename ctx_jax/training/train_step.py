"""The jitted train and eval steps, and the episode loss. No TensorFlow here.

An episode is a dict of arrays (shape letters: S support, Q query, W ways):
  support_images [S,H,W,3], support_labels [S] int32, support_mask [S] bool,
  query_images [Q,H,W,3], query_labels [Q] int32, query_mask [Q] bool.
Padding rows (mask False) contribute nothing: the model keeps them out of the
batch-norm moments and prototypes, and the loss and accuracy here are masked
means over the real queries.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from ctx_jax import models

Episode = dict[str, jax.Array]
MODEL_INPUT_KEYS = ("support_images", "support_labels", "support_mask",
                    "query_images", "query_labels", "query_mask")


def masked_episode_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array, axis_name: str | None = None
                           ) -> dict[str, jax.Array]:
  """Mean cross-entropy and accuracy over the real (mask True) queries.

  Args:
    logits: [Q, W] float.
    labels: [Q] int.
    mask: [Q] bool.
    axis_name: under `shard_map`, the mesh axis the queries are split over:
      the sums and the count are then summed over it, so the means are over
      all real queries of the episode, identical on every device.

  Returns:
    `loss`, `accuracy` (masked means) and `num_queries` (real count).
  """
  weights = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  sums = (jnp.sum(ce * weights), jnp.sum(correct * weights),
          jnp.sum(weights))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  ce_sum, correct_sum, num_queries = sums
  count = jnp.maximum(num_queries, 1.0)
  return {
      "loss": ce_sum / count,
      "accuracy": correct_sum / count,
      "num_queries": num_queries,
  }


def logit_width(num_ways: int, episode: Episode) -> int:
  """Logit columns a step computes: at most the episode's support rows.

  Labels are < the real ways <= the real support rows <= the padded support
  rows S, so classes >= S can never occur; computing `min(num_ways, S)`
  columns instead of `num_ways` (50 on MD, 500 with SimCLR episodes) gives
  the same loss and accuracy with less head work on small buckets.
  """
  return min(num_ways, episode["support_labels"].shape[0])


def _call_model(model: nnx.Module, episode: Episode, num_ways: int,
                axis_name: str | None = None):
  return model(episode["support_images"], episode["support_labels"],
               episode["support_mask"], episode["query_images"],
               num_ways=num_ways, axis_name=axis_name)


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
  logits = _call_model(model, episode, num_ways, axis_name)
  metrics = masked_episode_metrics(logits, episode["query_labels"],
                                   episode["query_mask"], axis_name)
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
      model, episode, logit_width(num_ways, episode), weight_decay)
  return apply_update(model, optimizer, grads, total_loss, metrics)


@nnx.jit(static_argnames=("num_ways",))
def eval_step(model: nnx.Module, episode: Episode,
              num_ways: int) -> dict[str, jax.Array]:
  """Loss and accuracy of one episode; the model should be in eval mode."""
  logits = _call_model(model, episode, logit_width(num_ways, episode))
  return masked_episode_metrics(logits, episode["query_labels"],
                                episode["query_mask"])
