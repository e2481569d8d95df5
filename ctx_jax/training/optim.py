"""The official CTX optimisation, as optax transformations.

The official trainer (google-research/meta-dataset `learn/trainer.py`) does:

1. loss = mean episode cross-entropy + L2 regulariser (added to the loss, so it
   is part of the gradient that gets normalised below);
2. normalised gradient descent: every gradient is divided by
   `sqrt(max(sum over all variables of sum(g**2), 1e-5))`;
3. Adam with a staircase exponential learning-rate decay. In distributed mode
   (the CTX default) this is the Keras Adam, whose update is
   `lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)` with eps=1e-7. That puts
   eps outside the bias correction, unlike `optax.adam`; at the tiny gradient
   magnitudes that normalised descent produces the difference is visible, so we
   implement the TF form (`scale_by_tf_adam`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def normalize_by_global_norm(min_sq_norm: float = 1e-5
                             ) -> optax.GradientTransformation:
  """Divides all updates by their global L2 norm (official normalised GD).

  Args:
    min_sq_norm: floor on the squared norm, as in the official code, so a zero
      gradient does not divide by zero.

  Returns:
    An `optax.GradientTransformation`. Under `jit` with sharded arrays the sum
    is global, which matches the official all-reduce before the norm.
  """

  def update_fn(updates, state, params=None):
    del params
    sq_norm = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(updates))
    scale = jax.lax.rsqrt(jnp.maximum(sq_norm, min_sq_norm))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update_fn)


class TfAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_tf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
                     ) -> optax.GradientTransformation:
  """Adam scaling exactly as TF/Keras computes it (eps after bias correction).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to `sqrt(v)` *before* the bias-correction factor is applied.

  Returns:
    An `optax.GradientTransformation` producing `m_t/(sqrt(v_t)+eps)` times
    `sqrt(1-b2^t)/(1-b1^t)` (to be scaled by `-learning_rate`).
  """

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return TfAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                       nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g),
                      state.nu, updates)
    count = state.count + 1
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    new_updates = jax.tree.map(
        lambda m, v: (correction * m / (jnp.sqrt(v) + eps)).astype(m.dtype),
        mu, nu)
    return new_updates, TfAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Staircase exponential decay: lr * decay_rate ** floor(step/decay_every)."""
  if config.decay_every and config.decay_rate != 1.0:
    return optax.exponential_decay(
        init_value=config.learning_rate, transition_steps=config.decay_every,
        decay_rate=config.decay_rate, staircase=True)
  return optax.constant_schedule(config.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """Builds the optimiser from `config.optimizer`-style fields.

  Args:
    config: has `learning_rate`, `decay_every`, `decay_rate`,
      `normalized_gradient_descent`, `adam_b1`, `adam_b2`, `adam_epsilon`.

  Returns:
    The gradient transformation (weight decay is in the loss, not here).
  """
  parts = []
  if config.normalized_gradient_descent:
    parts.append(normalize_by_global_norm())
  parts.append(scale_by_tf_adam(config.adam_b1, config.adam_b2,
                                config.adam_epsilon))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
  return optax.chain(*parts)
