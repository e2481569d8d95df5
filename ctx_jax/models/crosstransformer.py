"""The CrossTransformer (CTX) head of Doersch et al. (NeurIPS 2020).

For a query image, every query position p attends over all spatial positions
j of the support images of class c (a softmax per class, Eq. 2-4 of the
paper), which builds a query-aligned prototype t_c(p) from the support
values. The logit of class c is minus the squared distance between the query
values and t_c, summed over positions and channels and divided by the number
of query positions (shared/ALIGNMENT.md, "CrossTransformer head").

Memory: the full attention of an episode is [Q*P, S*J] (about 38 GB in
float32 for 500+500 images with 14x14 features), so queries are processed in
chunks under `jax.lax.map`, and each chunk is rematerialised
(`jax.checkpoint`) in the backward pass, as the official
`_get_dist_rematerialize` does one query at a time.

Inspection: `_aligned_prototypes` is the one implementation of the attention;
the training head keeps its prototypes, while `crosstransformer_attention`
(and `CrossTransformerHead.attention`, used by `models.inspect_episode` and
ctx-attention) also returns its weights.

Shape letters: S support images, Q query images, B queries in a chunk,
W ways (classes), J spatial positions of a support image, P spatial positions
of a query image, D key/query channels, C value channels, E embedding
channels.
"""

import functools
import math

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

from ctx_jax.models import backbone

# Logit of a class with no real support image: very negative so it gets no
# probability mass, finite so that cross-entropy and its gradient stay finite.
ABSENT_CLASS_LOGIT = -1e9


def class_sum(x: jax.Array, labels: jax.Array, num_ways: int) -> jax.Array:
  """Sums the rows of x [S,...] by class: [W,...], `W = num_ways`.

  A scatter-add of each row onto its class (`jax.ops.segment_sum`): S row
  additions, whatever `num_ways` is, where a one-hot matmul would cost S*W.
  Its gradient is a gather of the class rows. Labels must be in
  [0, num_ways); rows that must not count should be zero.
  """
  return jax.ops.segment_sum(x, labels, num_segments=num_ways)


def class_max(x: jax.Array, labels: jax.Array, num_ways: int) -> jax.Array:
  """Maximum of the rows of x [S,...] by class: [W,...]; -inf if empty."""
  return jax.ops.segment_max(x, labels, num_segments=num_ways)


def _einsum(spec: str, a: jax.Array, b: jax.Array, acc: jnp.dtype):
  """einsum accumulating and returning `acc` (at least float32).

  XLA:CPU has no bfloat16 x bfloat16 -> float32 dot, so there the operands
  are upcast; accelerators keep bfloat16 operands with float32 accumulation.
  """
  if jax.default_backend() == 'cpu':
    a, b = a.astype(acc), b.astype(acc)
  return jnp.einsum(spec, a, b, preferred_element_type=acc)


def _aligned_prototypes(queries, keys, values, labels, mask, num_ways):
  """Per-class attention of B queries and their query-aligned prototypes.

  Classes are aggregated with segment sums over the support rows
  (`class_sum`), so the cost is that of the S*J attention plus O(W) per
  query position, whatever the padded `num_ways` (a one-hot matmul would
  cost S*W per position and channel). The training path keeps only the
  prototypes; `crosstransformer_attention` also returns the weights.

  Args:
    queries: [B,P,D] projected query features (the key projection).
    keys: [S,J,D].
    values: [S,J,C].
    labels: [S] int32 in [0, num_ways).
    mask: [S] bool, False for padded support rows.
    num_ways: static number of classes W.

  Returns:
    (exp_logits [S,B,P,J], denom [W,B,P], prototypes [W,B,P,C]): the
    attention of position p of query b on position j of support image s is
    `exp_logits[s,b,p,j] / denom[labels[s],b,p]`, a softmax over the
    positions of the images of that class; prototypes in float32 (at least).
  """
  # Softmax in at least float32, whatever the compute dtype. Support rows
  # lead every intermediate: the class sums scatter whole [B,P,...] slabs of
  # one support image at a time.
  acc = jnp.promote_types(queries.dtype, jnp.float32)
  scale = 1.0 / math.sqrt(keys.shape[-1])
  logits = _einsum('bpd,sjd->sbpj', queries, keys, acc) * scale
  # -inf *before* exp: exp(-inf) = 0 with a zero gradient, whereas masking
  # exp(logits) afterwards would let an overflowing padded row produce NaN
  # gradients (0 * inf).
  logits = jnp.where(mask[:, None, None, None], logits, -jnp.inf)
  # Per-class max over all positions of all images of the class, as the
  # official stabiliser. It cancels exactly in the softmax, so it carries no
  # gradient. Classes without support give -inf; use 0 there so that padded
  # rows (logit -inf) give exp(-inf - 0) = 0, never NaN.
  image_max = jnp.max(lax.stop_gradient(logits), axis=-1)  # [S,B,P]
  shift = class_max(image_max, labels, num_ways)  # [W,B,P]
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  exp_logits = jnp.exp(logits - shift[labels][..., None])
  # Softmax denominator of each class: sum over its images and positions.
  denom = class_sum(jnp.sum(exp_logits, axis=-1), labels, num_ways)
  denom = jnp.where(denom > 0, denom, 1.0)  # Empty classes: avoid 0/0.
  per_image = _einsum('sbpj,sjc->sbpc', exp_logits.astype(values.dtype),
                      values, acc)
  prototypes = class_sum(per_image, labels, num_ways) / denom[..., None]
  return exp_logits, denom, prototypes


def _prototype_distances(query_values, prototypes):
  """[B,W] mean over the B queries' P positions of |value - prototype|^2.

  Args:
    query_values: [B,P,C].
    prototypes: [W,B,P,C] float32 (at least).
  """
  diff = query_values.astype(prototypes.dtype)[None] - prototypes
  return jnp.sum(jnp.square(diff), axis=(2, 3)).T / query_values.shape[1]


def _chunk_distances(queries, query_values, keys, values, labels, mask,
                     num_ways):
  """Distances [B,W] float32 of a chunk of B queries to their prototypes.

  Args: as `_aligned_prototypes`, plus query_values [B,P,C].
  """
  _, _, prototypes = _aligned_prototypes(queries, keys, values, labels, mask,
                                         num_ways)
  return _prototype_distances(query_values, prototypes)


def _check_head_inputs(queries, query_values, keys, values, labels, mask):
  """Raises ValueError unless the flattened head inputs agree in shape."""
  if queries.ndim != 3 or keys.ndim != 3 or values.ndim != 3:
    raise ValueError('queries, keys, values must be [N,positions,channels]; '
                     f'got {queries.shape}, {keys.shape}, {values.shape}')
  if query_values.shape[:2] != queries.shape[:2]:
    raise ValueError(f'query_values {query_values.shape} does not match '
                     f'queries {queries.shape}')
  if keys.shape[-1] != queries.shape[-1]:
    raise ValueError(f'keys {keys.shape} and queries {queries.shape} differ '
                     'in channels')
  if (values.shape[:2] != keys.shape[:2] or
      values.shape[-1] != query_values.shape[-1]):
    raise ValueError(f'values {values.shape} do not match keys {keys.shape} '
                     f'and query_values {query_values.shape}')
  if labels.shape != keys.shape[:1] or mask.shape != keys.shape[:1]:
    raise ValueError(f'labels {labels.shape} and mask {mask.shape} must be '
                     f'[{keys.shape[0]}]')


def _sanitise_padding(keys, values, labels, mask):
  """Zeroes padded support rows and gives them label 0.

  Non-finite padding can then never reach the (0-weighted) products, and an
  arbitrary padding label (e.g. -1) never indexes out of range.
  """
  keys = jnp.where(mask[:, None, None], keys, 0)
  values = jnp.where(mask[:, None, None], values, 0)
  return keys, values, jnp.where(mask, labels, 0)


def _present(labels, mask, num_ways):
  """[W] bool: the classes with at least one real support image."""
  return class_sum(mask.astype(jnp.int32), labels, num_ways) > 0


def crosstransformer_logits(queries, query_values, keys, values, labels,
                            mask, *, num_ways: int, chunk_size: int):
  """CTX logits, computed in rematerialised chunks of queries.

  Args:
    queries: [Q,P,D] query features under the key projection.
    query_values: [Q,P,C] query features under the value projection.
    keys: [S,J,D] support keys.
    values: [S,J,C] support values.
    labels: [S] int32 support labels in [0, num_ways).
    mask: [S] bool, False for padded support rows.
    num_ways: static number of classes W.
    chunk_size: queries per chunk; peak memory grows with it.

  Returns:
    [Q,W] float32 logits; ABSENT_CLASS_LOGIT for classes with no support.
  """
  _check_head_inputs(queries, query_values, keys, values, labels, mask)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  num_queries = queries.shape[0]
  chunk_size = min(chunk_size, num_queries)
  num_chunks = -(-num_queries // chunk_size)
  pad = num_chunks * chunk_size - num_queries
  keys, values, labels = _sanitise_padding(keys, values, labels, mask)

  def chunked(x):
    x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
    return x.reshape((num_chunks, chunk_size) + x.shape[1:])

  dist_fn = jax.checkpoint(
      functools.partial(_chunk_distances, num_ways=num_ways),
      prevent_cse=False)
  body = lambda qs: dist_fn(qs[0], qs[1], keys, values, labels, mask)
  dist = lax.map(body, (chunked(queries), chunked(query_values)))
  dist = dist.reshape((-1, num_ways))[:num_queries]
  return jnp.where(_present(labels, mask, num_ways), -dist,
                   ABSENT_CLASS_LOGIT)


def crosstransformer_logits_naive(queries, query_values, keys, values,
                                  labels, mask, *, num_ways: int):
  """Reference CTX logits that materialise the whole [Q,P,S,J] attention.

  Same arguments and result as `crosstransformer_logits`; kept for tests and
  the memory benchmark, not for training.
  """
  _check_head_inputs(queries, query_values, keys, values, labels, mask)
  keys, values, labels = _sanitise_padding(keys, values, labels, mask)
  dist = _chunk_distances(queries, query_values, keys, values, labels, mask,
                          num_ways)
  return jnp.where(_present(labels, mask, num_ways), -dist,
                   ABSENT_CLASS_LOGIT)


def crosstransformer_attention(queries, query_values, keys, values, labels,
                                mask, *, num_ways: int) -> dict[str, jax.Array]:
  """The head's intermediates, materialising the whole attention.

  The same computation as `crosstransformer_logits` (the same functions),
  for inspection: its memory is Q*P*S*J floats, so pass few queries.

  Args: as `crosstransformer_logits_naive`.

  Returns:
    `attention` [Q,P,S,J] float32: weight of query position p on position j
    of support image s. For each class c, the weights over the positions of
    the (real) support images of class c sum to one; padded rows get 0.
    `prototypes` [Q,W,P,C]: the query-aligned prototypes (attention-weighted
    sums of the support values of each class). `distances` [Q,W]: mean over
    positions of the squared distance between the query values and the
    prototypes. `logits` [Q,W]: minus the distances, ABSENT_CLASS_LOGIT for
    classes without support, as the head returns them.
  """
  _check_head_inputs(queries, query_values, keys, values, labels, mask)
  keys, values, labels = _sanitise_padding(keys, values, labels, mask)
  exp_logits, denom, prototypes = _aligned_prototypes(
      queries, keys, values, labels, mask, num_ways)
  dist = _prototype_distances(query_values, prototypes)
  attention = exp_logits / denom[labels][..., None]  # [S,Q,P,J]
  return {
      'attention': jnp.transpose(attention, (1, 2, 0, 3)),
      'prototypes': jnp.transpose(prototypes, (1, 0, 2, 3)),
      'distances': dist,
      'logits': jnp.where(_present(labels, mask, num_ways), -dist,
                          ABSENT_CLASS_LOGIT),
  }


class PointwiseConv(nnx.Module):
  """A bias-free 1x1 convolution with an HWIO kernel `weight` [1,1,E,D]."""

  def __init__(self, in_channels: int, out_channels: int, *, init: str,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.weight = nnx.Param(backbone.kernel_init(
        init, rngs.params(), (1, 1, in_channels, out_channels)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N,H,W,E] -> [N,H*W,D]: projects and flattens the positions."""
    y = jnp.einsum('nhwe,ed->nhwd', x.astype(self.dtype),
                   self.weight[0, 0].astype(self.dtype))
    return y.reshape((y.shape[0], -1, y.shape[-1]))


class CrossTransformerHead(nnx.Module):
  """Shared key/query projection `tformer_keys`, value `tformer_values`."""

  def __init__(self, in_channels: int, *, query_dim: int = 128,
               val_dim: int = 128, query_chunk_size: int = 8,
               init: str = 'official', dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.tformer_keys = PointwiseConv(in_channels, query_dim, init=init,
                                      dtype=dtype, rngs=rngs)
    self.tformer_values = PointwiseConv(in_channels, val_dim, init=init,
                                        dtype=dtype, rngs=rngs)
    self.query_chunk_size = query_chunk_size

  def __call__(self, support_emb: jax.Array, support_labels: jax.Array,
               support_mask: jax.Array, query_emb: jax.Array, *,
               num_ways: int, axis_name: str | None = None) -> jax.Array:
    """Logits [Q,W] float32 from support [S,h,w,E] and query [Q,h',w',E].

    Under `shard_map` (`axis_name` given) the arguments are this device's
    rows: the projected support keys and values, the labels and the mask are
    all-gathered over `axis_name` (in device order, i.e. the episode's row
    order), as the official distributed CTX learner aggregates them, so every
    device attends over the whole support set; the queries stay local.
    """
    support = self._project_support(support_emb, support_labels,
                                    support_mask, query_emb)
    if axis_name is not None:
      support = lax.all_gather(support, axis_name, tiled=True)
    return crosstransformer_logits(
        self.tformer_keys(query_emb), self.tformer_values(query_emb),
        *support, num_ways=num_ways, chunk_size=self.query_chunk_size)

  def _project_support(self, support_emb, support_labels, support_mask,
                       query_emb):
    """(keys [S,J,D], values [S,J,C], labels, mask) of the support set."""
    if support_emb.ndim != 4 or query_emb.ndim != 4:
      raise ValueError('embeddings must be [N,h,w,E]; got '
                       f'{support_emb.shape} and {query_emb.shape}')
    return (self.tformer_keys(support_emb), self.tformer_values(support_emb),
            support_labels, support_mask)

  def attention(self, support_emb: jax.Array, support_labels: jax.Array,
                support_mask: jax.Array, query_emb: jax.Array, *,
                num_ways: int) -> dict[str, jax.Array]:
    """`crosstransformer_attention` of embeddings, plus the projections.

    Single-device (no `axis_name`); memory Q*P*S*J floats, so pass few
    queries. Returns the keys of `crosstransformer_attention` and
    `support_values` [S,J,C], `query_values` [Q,P,C].
    """
    keys, values, labels, mask = self._project_support(
        support_emb, support_labels, support_mask, query_emb)
    query_values = self.tformer_values(query_emb)
    out = crosstransformer_attention(
        self.tformer_keys(query_emb), query_values, keys, values, labels,
        mask, num_ways=num_ways)
    return dict(out, support_values=values, query_values=query_values)
