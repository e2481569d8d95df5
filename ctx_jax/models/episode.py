"""What the model computes on an episode: logits, masked loss and accuracy.

Shared by the train steps (`ctx_jax.training`) and the eval steps
(`ctx_jax.eval.step`). No jit here and no TensorFlow.

An episode is a dict of arrays (shape letters: S support, Q query, W ways):
  support_images [S,H,W,3], support_labels [S] int32, support_mask [S] bool,
  query_images [Q,H,W,3], query_labels [Q] int32, query_mask [Q] bool.
Padding rows (mask False) contribute nothing: the model keeps them out of the
batch-norm moments and prototypes, and the loss and accuracy here are masked
means over the real queries.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import optax

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


def call_model(model: nnx.Module, episode: Episode, num_ways: int,
               axis_name: str | None = None) -> jax.Array:
  """The model's [Q, num_ways] logits for `episode`."""
  return model(episode["support_images"], episode["support_labels"],
               episode["support_mask"], episode["query_images"],
               num_ways=num_ways, axis_name=axis_name)
