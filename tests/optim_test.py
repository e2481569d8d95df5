"""The official optimisation: normalised GD, TF-form Adam, staircase decay."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ctx_jax.training import optim


def _opt_config(**kw):
  cfg = ml_collections.ConfigDict(dict(
      learning_rate=6e-4, decay_every=2000, decay_rate=0.915193802145601,
      normalized_gradient_descent=True, adam_b1=0.9, adam_b2=0.999,
      adam_epsilon=1e-7))
  cfg.update(kw)
  return cfg


def test_normalize_by_global_norm_gives_unit_norm():
  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
  out, _ = optim.normalize_by_global_norm().update(grads, optax.EmptyState())
  np.testing.assert_allclose(float(optax.tree.norm(out)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)


def test_normalize_floors_tiny_norm():
  grads = {"a": jnp.array([1e-4])}
  out, _ = optim.normalize_by_global_norm().update(grads, optax.EmptyState())
  # sq norm 1e-8 < 1e-5 floor: divided by sqrt(1e-5), not by 1e-4.
  np.testing.assert_allclose(out["a"], [1e-4 / np.sqrt(1e-5)], rtol=1e-5)


def test_tf_adam_matches_keras_formula():
  b1, b2, eps, lr = 0.9, 0.999, 1e-7, 1e-3
  tx = optax.chain(optim.scale_by_tf_adam(b1, b2, eps),
                   optax.scale_by_learning_rate(lr))
  params = jnp.array([0.5, -1.0, 2.0])
  state = tx.init(params)
  rng = np.random.default_rng(0)
  m = np.zeros(3)
  v = np.zeros(3)
  expected = np.asarray(params, np.float64)
  for t in range(1, 6):
    g = rng.normal(size=3) * 1e-4
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state)
    params = params + updates
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    expected = expected - alpha * m / (np.sqrt(v) + eps)
  np.testing.assert_allclose(params, expected, rtol=2e-5)


def test_tf_adam_differs_from_optax_adam_at_small_gradients():
  # The reason scale_by_tf_adam exists: eps placement matters here.
  g = jnp.full((4,), 1e-7)
  tf_up, _ = optim.scale_by_tf_adam().update(g, optim.scale_by_tf_adam()
                                              .init(g))
  ox_up, _ = optax.scale_by_adam(eps=1e-7).update(
      g, optax.scale_by_adam(eps=1e-7).init(g))
  assert abs(float(tf_up[0]) - float(ox_up[0])) > 0.01


def test_staircase_schedule():
  sched = optim.learning_rate_schedule(_opt_config())
  assert float(sched(0)) == pytest.approx(6e-4)
  assert float(sched(1999)) == pytest.approx(6e-4)
  assert float(sched(2000)) == pytest.approx(6e-4 * 0.915193802145601)
  assert float(sched(4500)) == pytest.approx(6e-4 * 0.915193802145601**2)


def test_make_optimizer_first_step_size():
  # With normalised GD the first Adam step is ~lr * sign(g) per element.
  tx = optim.make_optimizer(_opt_config(learning_rate=1e-2))
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.array([10.0, -5.0, 1.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-1e-2, 1e-2, -1e-2], rtol=1e-3)
