"""Prototypical Network head (Snell et al. 2017), the CTX paper's baseline.

As the official `PrototypicalNetworkLearner`: embeddings are mean-pooled over
space, a class prototype is the mean of its real support embeddings, and the
logit is minus the squared Euclidean distance, or, with the cosine option,
the cosine similarity after `l2_normalize(x, epsilon=1e-3)`.

Shape letters: S support images, Q query images, W ways, E embedding
channels.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from ctx_jax.models import crosstransformer

_DISTANCES = ('euclidean', 'cosine')
# TF's l2_normalize divides by sqrt(max(sum x^2, epsilon)).
_L2_EPSILON = 1e-3


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / sqrt(max(|x|^2, 1e-3)) over the last axis, as `tf.nn.l2_normalize`."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _L2_EPSILON))


def protonet_logits(support_emb: jax.Array, support_labels: jax.Array,
                    support_mask: jax.Array, query_emb: jax.Array, *,
                    num_ways: int, distance: str = 'euclidean') -> jax.Array:
  """ProtoNet logits from pooled embeddings.

  Args:
    support_emb: [S,E] support embeddings.
    support_labels: [S] int32 labels in [0, num_ways).
    support_mask: [S] bool, False for padded rows.
    query_emb: [Q,E] query embeddings.
    num_ways: static number of classes W.
    distance: 'euclidean' (negative squared distance) or 'cosine'.

  Returns:
    [Q,W] float32 logits; ABSENT_CLASS_LOGIT for classes with no support.
  """
  if distance not in _DISTANCES:
    raise ValueError(f'distance must be one of {_DISTANCES}, got {distance!r}')
  if support_emb.ndim != 2 or query_emb.ndim != 2:
    raise ValueError('embeddings must be [N,E]; got '
                     f'{support_emb.shape} and {query_emb.shape}')
  if support_labels.shape != support_emb.shape[:1] or (
      support_mask.shape != support_emb.shape[:1]):
    raise ValueError(f'labels {support_labels.shape} and mask '
                     f'{support_mask.shape} must be [{support_emb.shape[0]}]')
  support_emb = jnp.where(support_mask[:, None],
                          support_emb.astype(jnp.float32), 0.0)
  query_emb = query_emb.astype(jnp.float32)
  # Class sums by segment sums: S row additions, whatever num_ways is.
  labels = jnp.where(support_mask, support_labels, 0)
  counts = crosstransformer.class_sum(support_mask.astype(jnp.float32),
                                      labels, num_ways)  # [W]
  prototypes = crosstransformer.class_sum(support_emb, labels, num_ways)
  prototypes /= jnp.maximum(counts, 1.0)[:, None]
  if distance == 'cosine':
    logits = jnp.einsum('qe,we->qw', _l2_normalize(query_emb),
                        _l2_normalize(prototypes))
  else:
    diff = query_emb[:, None, :] - prototypes[None, :, :]  # [Q,W,E]
    logits = -jnp.sum(jnp.square(diff), axis=-1)
  return jnp.where(counts > 0, logits, crosstransformer.ABSENT_CLASS_LOGIT)


class ProtoNetHead(nnx.Module):
  """A parameter-free head that pools feature maps and applies ProtoNet."""

  def __init__(self, distance: str = 'euclidean'):
    if distance not in _DISTANCES:
      raise ValueError(f'distance must be one of {_DISTANCES}, got '
                       f'{distance!r}')
    self.distance = distance

  def __call__(self, support_emb: jax.Array, support_labels: jax.Array,
               support_mask: jax.Array, query_emb: jax.Array, *,
               num_ways: int, axis_name: str | None = None) -> jax.Array:
    """Logits [Q,W] float32 from feature maps [S,h,w,E] and [Q,h,w,E].

    Under `shard_map` (`axis_name` given) the pooled support embeddings,
    labels and mask are all-gathered over `axis_name` (the official
    `MetricLearner` aggregates the embeddings), so the prototypes are those of
    the whole support set; the queries stay local.
    """
    if support_emb.ndim != 4 or query_emb.ndim != 4:
      raise ValueError('embeddings must be [N,h,w,E]; got '
                       f'{support_emb.shape} and {query_emb.shape}')
    pool = lambda x: jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    support = (pool(support_emb), support_labels, support_mask)
    if axis_name is not None:
      support = jax.lax.all_gather(support, axis_name, tiled=True)
    return protonet_logits(*support, pool(query_emb), num_ways=num_ways,
                           distance=self.distance)
