"""Class aggregation of the heads: segment sums equal the one-hot matmuls.

The CTX and ProtoNet heads aggregate support rows by class with segment sums
(`crosstransformer.class_sum`), whose cost does not grow with the padded
number of ways. The reference here is the one-hot formulation of the first
release (the head that matched the official fixture), kept verbatim in
this file: values and gradients must agree for 5 to 500 ways, with padded
support rows, absent (padded) ways and shuffled labels.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx_jax import models
from ctx_jax.models import protonet


def class_onehot(labels, mask, num_ways):
  """[S,W] one-hot of labels with padded rows zeroed (the first release's)."""
  onehot = jax.nn.one_hot(labels, num_ways, dtype=jnp.float32)
  return onehot * mask.astype(jnp.float32)[:, None]


def onehot_chunk_distances(queries, query_values, keys, values, labels, mask,
                           onehot):
  """The first release's `_chunk_distances` (one-hot class aggregation)."""
  scale = 1.0 / math.sqrt(keys.shape[-1])
  logits = jnp.einsum('bpd,sjd->bpsj', queries, keys) * scale
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  image_max = jnp.max(lax.stop_gradient(logits), axis=-1)
  class_max = jnp.max(jnp.where(onehot > 0, image_max[..., None], -jnp.inf),
                      axis=2)
  class_max = jnp.where(jnp.isfinite(class_max), class_max, 0.0)
  shift = jnp.take(class_max, labels, axis=-1, mode='clip')
  exp_logits = jnp.exp(logits - shift[..., None])
  denom = jnp.einsum('bps,sw->bpw', jnp.sum(exp_logits, axis=-1), onehot)
  denom = jnp.where(denom > 0, denom, 1.0)
  per_image = jnp.einsum('bpsj,sjc->bpsc', exp_logits, values)
  prototypes = jnp.einsum('bpsc,sw->bpwc', per_image, onehot) / denom[..., None]
  diff = query_values[:, :, None, :] - prototypes
  return jnp.sum(jnp.square(diff), axis=(1, 3)) / queries.shape[1]


def onehot_ctx_logits(queries, query_values, keys, values, labels, mask, *,
                      num_ways):
  onehot = class_onehot(labels, mask, num_ways)
  keys = jnp.where(mask[:, None, None], keys, 0)
  values = jnp.where(mask[:, None, None], values, 0)
  labels = jnp.where(mask, labels, 0)
  dist = onehot_chunk_distances(queries, query_values, keys, values, labels,
                                mask, onehot)
  present = jnp.sum(onehot, axis=0) > 0
  return jnp.where(present, -dist, models.ABSENT_CLASS_LOGIT)


def onehot_protonet_logits(support_emb, labels, mask, query_emb, *, num_ways):
  onehot = class_onehot(labels, mask, num_ways)
  support_emb = jnp.where(mask[:, None], support_emb, 0.0)
  counts = jnp.sum(onehot, axis=0)
  prototypes = jnp.einsum('sw,se->we', onehot, support_emb)
  prototypes /= jnp.maximum(counts, 1.0)[:, None]
  diff = query_emb[:, None, :] - prototypes[None, :, :]
  logits = -jnp.sum(jnp.square(diff), axis=-1)
  return jnp.where(counts > 0, logits, models.ABSENT_CLASS_LOGIT)


def episode_labels(rng, num_real_ways, num_support, num_real):
  """Shuffled labels: every real way appears, padded rows carry junk."""
  labels = np.concatenate([np.arange(num_real_ways),
                           rng.integers(0, num_real_ways,
                                        num_real - num_real_ways)])
  rng.shuffle(labels)
  junk = rng.integers(0, 10**6, num_support - num_real)  # Padding labels.
  mask = np.arange(num_support) < num_real
  return np.concatenate([labels, junk]).astype(np.int32), mask


# (padded ways W, real ways, support rows, real support rows): 5-way
# 1-shot, a 50-way MD episode padded to 140 rows, a 500-way SimCLR episode
# (one class per support image) and a 5-way episode computed as 500-way.
CASES = [(5, 5, 8, 5), (50, 20, 140, 100), (500, 500, 512, 500),
         (500, 5, 24, 20)]


@pytest.mark.parametrize('num_ways,real_ways,num_support,real_support',
                         CASES)
def test_ctx_head_equals_onehot_head(num_ways, real_ways, num_support,
                                     real_support):
  rng = np.random.default_rng(num_ways + num_support)
  labels, mask = episode_labels(rng, real_ways, num_support, real_support)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  num_query, positions, dim = 6, 4, 8
  inputs = (normal(num_query, positions, dim),  # queries [Q,P,D]
            normal(num_query, positions, dim),  # query values [Q,P,C]
            3 * normal(num_support, positions, dim),  # keys [S,J,D]
            normal(num_support, positions, dim))  # values [S,J,C]
  weights = normal(num_query, num_ways)

  def loss(fn, x):
    logits = fn(*x, jnp.asarray(labels), jnp.asarray(mask),
                num_ways=num_ways)
    return jnp.sum(jnp.where(logits > -1e8, logits, 0) * weights), logits

  new_fn = functools.partial(models.crosstransformer_logits, chunk_size=4)
  grads, logits = jax.jit(jax.grad(functools.partial(loss, new_fn),
                                   has_aux=True))(inputs)
  ref_grads, ref_logits = jax.jit(jax.grad(
      functools.partial(loss, onehot_ctx_logits), has_aux=True))(inputs)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  absent = np.setdiff1d(np.arange(num_ways), labels[mask])
  np.testing.assert_array_equal(np.asarray(logits)[:, absent],
                                models.ABSENT_CLASS_LOGIT)
  for g, ref in zip(grads, ref_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
  # Padded support rows get no gradient.
  np.testing.assert_array_equal(np.asarray(grads[2])[~mask], 0)
  np.testing.assert_array_equal(np.asarray(grads[3])[~mask], 0)


@pytest.mark.parametrize('num_ways,real_ways,num_support,real_support',
                         CASES)
def test_protonet_head_equals_onehot_head(num_ways, real_ways, num_support,
                                          real_support):
  rng = np.random.default_rng(num_ways)
  labels, mask = episode_labels(rng, real_ways, num_support, real_support)
  support = rng.normal(size=(num_support, 16)).astype(np.float32)
  query = rng.normal(size=(7, 16)).astype(np.float32)
  weights = rng.normal(size=(7, num_ways)).astype(np.float32)

  def loss(fn, s, q):
    logits = fn(s, jnp.asarray(labels), jnp.asarray(mask), q,
                num_ways=num_ways)
    return jnp.sum(jnp.where(logits > -1e8, logits, 0) * weights), logits

  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn),
                                     argnums=(0, 1), has_aux=True))
  grads, logits = grad(protonet.protonet_logits)(support, query)
  ref_grads, ref_logits = grad(onehot_protonet_logits)(support, query)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-4)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)


def head_flops(fn, num_ways, num_support=64, num_query=8, positions=36,
               dim=128):
  """XLA's FLOP count of forward + backward of one head call (one chunk)."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (f32(num_query, positions, dim), f32(num_query, positions, dim),
          f32(num_support, positions, dim), f32(num_support, positions, dim),
          jax.ShapeDtypeStruct((num_support,), jnp.int32),
          jax.ShapeDtypeStruct((num_support,), jnp.bool_))

  def loss(*x):
    logits = fn(*x, num_ways=num_ways)
    return jnp.sum(jnp.where(logits > -1e8, logits, 0.0))

  analysis = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
      *args).compile().cost_analysis()
  return float(analysis['flops'])


def test_head_cost_does_not_grow_with_padded_ways():
  # One chunk holds every query, so XLA counts the whole head.
  new = functools.partial(models.crosstransformer_logits, chunk_size=8)

  def per_way(fn, num_support):
    """FLOPs per extra padded way, per query position."""
    extra = (head_flops(fn, 500, num_support) -
             head_flops(fn, 50, num_support))
    return extra / 450 / (8 * 36)

  # A padded way costs the new head the distance to one empty prototype,
  # O(C) per query position, whatever the support size; the one-hot head
  # pays a whole [S,C] aggregation per way.
  new_small, new_large = per_way(new, 64), per_way(new, 256)
  ref_small, ref_large = (per_way(onehot_ctx_logits, 64),
                          per_way(onehot_ctx_logits, 256))
  assert new_large == pytest.approx(new_small, rel=0.05)
  assert new_small < 32 * 128  # A few dozen FLOPs per channel.
  assert ref_large > 3 * ref_small
  assert ref_small > 10 * new_small
