"""The shard_map train/eval steps equal the single-device and GSPMD steps.

One padded episode and one set of initial parameters; the reference is the
GSPMD step (`train_step.py`) on one device. The shard_map step on 1, 2 and 8
devices (sub-meshes of the 8 fake CPU devices) must give the same loss,
gradients, updated parameters, optimizer state and batch-norm EMA statistics
to float32 round-off. The episode is padded so that on 8 devices some
devices hold no real support row and no real query, and `num_ways` exceeds
the classes present.
"""

import functools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx_jax import mesh as mesh_lib
from ctx_jax import models
from ctx_jax.eval import step as eval_step_lib
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import optim
from ctx_jax.training import sharded_step
from ctx_jax.training import train_step as step_lib
from experiments import demo
from tests import fakes

NUM_WAYS = 4  # Labels use 3 classes: class 3 is absent.
WEIGHT_DECAY = 1e-3
# Float32 round-off of a different summation order. Measured on this episode
# (8 devices vs 1): scalar metrics <= 9e-6 relative; gradients and Adam
# moments <= 1.2e-5 relative L2 per array; parameters after two steps <= 1e-5
# absolute (0.5% of one Adam step of lr 2e-3); BN EMAs <= 1e-6 absolute.
METRIC_RTOL = 5e-5
TREE_RTOL = 1e-4
PARAM_ATOL_IN_STEPS = 0.02  # Of the learning rate.


def config_for(head):
  config = demo.get_config("smoke")
  config.model.head = head
  config.model.query_dim = config.model.val_dim = 16
  config.model.query_chunk_size = 2
  # Adam's first update is lr * g / (|g| + eps): with the recipe's eps=1e-7
  # it is +-lr for every gradient element above ~1e-7, so float32 round-off
  # (another summation order: devices, kernels, CPU model) in a near-zero
  # gradient flips whole lr-sized steps, and the second step then differs
  # by much more than round-off. A larger eps keeps the update continuous in
  # g, so these tests compare the steps rather than that amplification.
  config.optimizer.adam_epsilon = 1e-3
  return config


def make_episode():
  # 16 support rows of which 9 real, 8 queries of which 5 real: on 8 devices
  # (2 support + 1 query rows each) devices 5-7 hold only padding.
  return fakes.fake_episode(16, 8, ways=3, image_size=16, real_support=9,
                            real_query=5, seed=7)


@functools.lru_cache(maxsize=None)
def _initial_state(head):
  """(graphdef, host numpy state) of the model and optimiser, built once."""
  config = config_for(head)
  model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer),
                            wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, jax.tree.map(np.asarray, jax.device_get(state))


def _state(config, mesh):
  """Model (train mode) and optimiser, replicated on `mesh`; same every call."""
  graphdef, state = _initial_state(config.model.head)
  # From numpy: fresh device buffers, which the steps may donate.
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  model, optimizer = nnx.merge(graphdef, state)
  model.train()
  return model, optimizer


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(actual, expected, rtol=TREE_RTOL):
  """Per-array relative L2 error below rtol (abs floor for ~0 arrays)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
  worst = 0.0
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6)
    worst = max(worst, err)
    assert err < rtol, f"{jax.tree_util.keystr(path)}: rel err {err:.2e}"
  return worst


@nnx.jit(static_argnames=("num_ways", "weight_decay"))
def _reference_grads(model, episode, num_ways, weight_decay):
  grad_fn = nnx.value_and_grad(step_lib.episode_loss, has_aux=True)
  (total, metrics), grads = grad_fn(model, episode, num_ways, weight_decay)
  return total, metrics, nnx.to_pure_dict(grads)


def _gspmd_grads(config, episode):
  mesh = mesh_lib.make_mesh(1)
  model, _ = _state(config, mesh)
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  with jax.set_mesh(mesh):
    return _host(_reference_grads(model, dev, NUM_WAYS, WEIGHT_DECAY))


def _sharded_grads(config, episode, num_devices):
  mesh = mesh_lib.make_mesh(num_devices)
  model, _ = _state(config, mesh)
  before = _host(nnx.to_pure_dict(nnx.state(model)))
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  with jax.set_mesh(mesh):
    out = sharded_step.loss_and_grads(model, dev, NUM_WAYS, WEIGHT_DECAY,
                                      mesh=mesh)
  # The gradient function leaves the model (and its EMA) untouched.
  chex.assert_trees_all_equal(_host(nnx.to_pure_dict(nnx.state(model))),
                              before)
  return _host(out)


def _run_steps(config, episode, num_devices, parallelism, num_steps=2):
  """Metrics of each step and the final model + optimiser state."""
  mesh = mesh_lib.make_mesh(num_devices)
  model, optimizer = _state(config, mesh)
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  metrics = []
  with jax.set_mesh(mesh):
    for _ in range(num_steps):
      if parallelism == "gspmd":
        m = step_lib.train_step(model, optimizer, dev, NUM_WAYS, WEIGHT_DECAY)
      else:
        m = sharded_step.train_step(model, optimizer, dev, NUM_WAYS,
                                    WEIGHT_DECAY, mesh=mesh)
      metrics.append(_host(m))
  state = _host(nnx.to_pure_dict(nnx.state((model, optimizer))))
  return metrics, state


@pytest.mark.parametrize("head,device_counts", [("ctx", (1, 2, 8)),
                                                ("protonet", (8,))])
def test_gradients_match_gspmd_on_one_device(head, device_counts):
  config = config_for(head)
  episode = make_episode()
  ref_total, ref_metrics, ref_grads = _gspmd_grads(config, episode)
  assert ref_metrics["num_queries"] == 5
  assert np.isfinite(ref_total)
  for n in device_counts:
    total, metrics, grads = _sharded_grads(config, episode, n)
    np.testing.assert_allclose(total, ref_total, rtol=METRIC_RTOL)
    for key in ("loss", "accuracy", "num_queries", "regularizer"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key],
                                 rtol=METRIC_RTOL, err_msg=key)
    worst = _assert_trees_close(grads, ref_grads)
    print(f"{head} on {n} devices: worst gradient rel err {worst:.2e}")
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("head", ["ctx", "protonet"])
def test_train_step_matches_gspmd(head):
  config = config_for(head)
  episode = make_episode()
  ref_metrics, ref_state = _run_steps(config, episode, 1, "gspmd")
  metrics, state = _run_steps(config, episode, 8, "shard_map")
  for ref, got in zip(ref_metrics, metrics):
    assert set(got) == set(ref)
    for key in ref:
      np.testing.assert_allclose(got[key], ref[key], rtol=METRIC_RTOL,
                                 atol=1e-7, err_msg=key)
  # The step moved the parameters and the EMA statistics.
  assert ref_metrics[0]["update_norm"] > 0
  model_state = state[0]
  initial = nnx.to_pure_dict(_initial_state(head)[1])[0]
  ema = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                      jax.tree_util.tree_flatten_with_path(tree)[0]
                      if "_ema" in jax.tree_util.keystr(k)}
  assert any(not np.allclose(a, b) for a, b in
             zip(ema(model_state).values(), ema(initial).values()))
  # Parameters and BN EMAs after two steps: elementwise. Parameters to a
  # small fraction of one step (Adam divides by sqrt(v) + 1e-7, so elements
  # whose normalised gradient is ~1e-7 amplify round-off relative to
  # themselves, not to the step).
  atol = PARAM_ATOL_IN_STEPS * config.optimizer.learning_rate
  for (path, got), (_, ref) in zip(
      jax.tree_util.tree_flatten_with_path(model_state)[0],
      jax.tree_util.tree_flatten_with_path(ref_state[0])[0]):
    name = jax.tree_util.keystr(path)
    if "_ema" in name:
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6,
                                 err_msg=name)
    else:
      np.testing.assert_allclose(got, ref, rtol=0, atol=atol, err_msg=name)
  # Optimizer state (step, Adam count and moments): relative L2 per array.
  worst = _assert_trees_close(state[1], ref_state[1])
  print(f"{head}: worst optimizer-state rel err after 2 steps {worst:.2e}")


def test_eval_step_matches_gspmd():
  config = config_for("ctx")
  episode = make_episode()
  results = []
  for n, parallelism in ((1, "gspmd"), (8, "shard_map")):
    mesh = mesh_lib.make_mesh(n)
    model, _ = _state(config, mesh)
    model.eval()
    dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
    with jax.set_mesh(mesh):
      if parallelism == "gspmd":
        results.append(_host(eval_step_lib.eval_step(model, dev, NUM_WAYS)))
      else:
        results.append(_host(eval_step_lib.sharded_eval_step(model, dev, NUM_WAYS,
                                                    mesh=mesh)))
  assert results[0]["num_queries"] == 5
  for key in results[0]:
    np.testing.assert_allclose(results[1][key], results[0][key], rtol=2e-6,
                               err_msg=key)


def test_batch_norm_moments_are_synced_over_the_axis():
  # Rows split over 4 devices: synced moments equal the moments of all rows.
  bn = models.BatchNorm(3, epsilon=1e-5, momentum=0.9)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(2.0, 3.0, (8, 2, 2, 3)), jnp.float32)
  weight = jnp.asarray([1, 1, 0, 1, 0, 0, 1, 1], jnp.float32)
  expected = bn(x, weight)
  mesh = mesh_lib.make_mesh(4)
  graphdef, state = nnx.split(bn)

  def local(state, x, weight):
    module = nnx.merge(graphdef, state)
    y = module(x, weight, axis_name=mesh_lib.DATA_AXIS)
    return y, nnx.state(module)

  bn2 = models.BatchNorm(3, epsilon=1e-5, momentum=0.9)
  graphdef, state = nnx.split(bn2)
  y, new_state = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(jax.P(), jax.P("data"), jax.P("data")),
      out_specs=(jax.P("data"), jax.P())))(state, x, weight)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  nnx.update(bn2, new_state)
  np.testing.assert_allclose(bn2.mean_ema[...], bn.mean_ema[...], rtol=1e-6)
  np.testing.assert_allclose(bn2.var_ema[...], bn.var_ema[...], rtol=1e-5)


def test_indivisible_episode_is_rejected():
  config = config_for("ctx")
  mesh = mesh_lib.make_mesh(8)
  model, optimizer = _state(config, mesh)
  episode = {k: jnp.asarray(v) for k, v in
             fakes.fake_episode(12, 8, ways=3, image_size=16).items()}
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sharded_step.train_step(model, optimizer, episode, NUM_WAYS,
                            WEIGHT_DECAY, mesh=mesh)


def test_parallelism_config_selects_the_step():
  mesh = mesh_lib.make_mesh(2)
  assert config_for("ctx").train.parallelism == "shard_map"
  train_fn, eval_fn = sharded_step.select_steps("shard_map", mesh)
  assert train_fn.func is sharded_step.train_step
  assert train_fn.keywords == {"mesh": mesh}
  assert eval_fn.func is eval_step_lib.sharded_eval_step
  assert sharded_step.select_steps("gspmd", mesh) == (step_lib.train_step,
                                                      eval_step_lib.eval_step)
  with pytest.raises(ValueError, match="config.train.parallelism.*'pmap'"):
    sharded_step.select_steps("pmap", mesh)
