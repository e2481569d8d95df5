"""Train step and train loop: one step, devices, end-to-end with resume."""

import json

from flax import nnx
import jax
import numpy as np
import pytest

from ctx_jax import mesh as mesh_lib
from ctx_jax import models
from ctx_jax.checkpoints import export
from ctx_jax.checkpoints import train_state
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import state as state_lib
from ctx_jax.training import train
from ctx_jax.training import train_step as step_lib
from ctx_jax.training import workdir as workdir_lib
from experiments import demo
from tests import fakes


def _tiny_config():
  config = demo.get_config("smoke")
  config.model.query_dim = 16
  config.model.val_dim = 16
  return config


def _state(config, num_devices):
  mesh = mesh_lib.make_mesh(num_devices)
  model, optimizer = state_lib.create_train_state(config, mesh)
  return mesh, model, optimizer


def _step(config, num_devices, episode):
  mesh, model, optimizer = _state(config, num_devices)
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  with jax.set_mesh(mesh):
    model.train()
    metrics = step_lib.train_step(model, optimizer, dev, 4, 1e-4)
  return jax.device_get(metrics), nnx.to_pure_dict(
      jax.device_get(nnx.state(model)))


def test_train_step_updates_params_and_bn_statistics():
  config = _tiny_config()
  episode = fakes.fake_episode(8, 8, ways=4)
  metrics, after = _step(config, 1, episode)
  _, model, _ = _state(config, 1)
  before = nnx.to_pure_dict(jax.device_get(nnx.state(model)))
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert metrics["num_queries"] == 8
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)
  flat = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(changed)[0]}
  assert any(v for k, v in flat.items() if "mean_ema" in k)
  assert any(v for k, v in flat.items() if "weight" in k)


def test_one_and_eight_devices_agree():
  config = _tiny_config()
  episode = fakes.fake_episode(16, 8, ways=4, real_support=13, real_query=7)
  m1, p1 = _step(config, 1, episode)
  m8, p8 = _step(config, 8, episode)
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(m1[key], m8[key], rtol=2e-4, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               p1, p8)


def test_padding_rows_do_not_change_the_loss():
  config = _tiny_config()
  episode = fakes.fake_episode(8, 8, ways=4)
  padded = fakes.fake_episode(16, 16, ways=4, real_support=8, real_query=8)
  for key in episode_lib.MODEL_INPUT_KEYS:
    padded[key][:8] = episode[key]
  m_small, _ = _step(config, 1, episode)
  m_pad, _ = _step(config, 1, padded)
  np.testing.assert_allclose(m_small["loss"], m_pad["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_small["grad_norm"], m_pad["grad_norm"],
                             rtol=1e-4)


def test_train_step_compiles_once_per_bucket():
  config = _tiny_config()
  mesh, model, optimizer = _state(config, 1)
  traces = []
  original = step_lib.episode_loss

  def counting_loss(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  step_lib.episode_loss = counting_loss
  try:
    with jax.set_mesh(mesh):
      model.train()
      for seed, (real_s, real_q) in enumerate([(5, 3), (8, 8), (3, 6)]):
        ep = fakes.fake_episode(8, 8, ways=4, real_support=real_s,
                                real_query=real_q, seed=seed)
        dev = mesh_lib.shard_episode(ep, mesh, episode_lib.MODEL_INPUT_KEYS)
        step_lib.train_step(model, optimizer, dev, 4, 1e-4)
  finally:
    step_lib.episode_loss = original
  assert len(traces) == 1


def test_train_and_evaluate_end_to_end_with_resume(tmp_path):
  data = fakes.make_tiny_demo(tmp_path / "data")
  config = _tiny_config()
  config.data.records_root = str(data.parent)
  config.num_devices = 2
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))
  assert results["step"] == 3
  acc = results["test"]["glyphs"]
  assert 0.0 <= acc["mean"] <= 1.0 and acc["num_episodes"] == 4
  saved = json.loads((workdir / workdir_lib.RESULTS_FILE).read_text())
  assert saved["test"]["glyphs"] == acc
  assert (workdir / "export" / export.MODEL_CONFIG_FILE).is_file()
  ckpt = train_state.TrainCheckpointer(workdir, 2)
  assert ckpt.latest_step() == 3
  ckpt.close()

  # Resume: a longer run continues from step 3 instead of starting over.
  config.train.num_steps = 5
  (workdir / workdir_lib.RESULTS_FILE).unlink()
  results = train.train_and_evaluate(config, str(workdir))
  assert results["step"] == 5
  ckpt = train_state.TrainCheckpointer(workdir, 2)
  assert ckpt.latest_step() == 5
  ckpt.close()

  # The export reloads into a model that gives the training run's logits.
  model, model_config = export.load_exported_model(workdir / "export")
  assert model_config.backbone == "resnet_tiny"


def test_export_round_trip(tmp_path):
  config = models.default_model_config()
  config.backbone = "resnet_tiny"
  config.max_stride = 8
  config.query_dim = config.val_dim = 8
  model = models.build_model(config, rngs=nnx.Rngs(1))
  export.export_model(tmp_path / "m", model, config)
  with pytest.raises(FileExistsError, match="not empty"):
    export.export_model(tmp_path / "m", model, config)
  loaded, loaded_config = export.load_exported_model(tmp_path / "m")
  assert loaded_config.to_dict() == config.to_dict()
  ep = fakes.fake_episode(6, 4, ways=3)
  model.eval()
  loaded.eval()
  args = (ep["support_images"], ep["support_labels"], ep["support_mask"],
          ep["query_images"])
  np.testing.assert_allclose(model(*args, num_ways=3),
                             loaded(*args, num_ways=3), rtol=1e-6)


def test_nan_guard_message():
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    train._check_finite(7, {"loss": float("nan"), "accuracy": 0.5}, "/x")


def test_init_from_copies_the_backbone_only(tmp_path):
  config = _tiny_config()
  source = models.build_model(config.model, rngs=nnx.Rngs(5))
  export.export_model(tmp_path / "pretrained", source, config.model)
  _, model, _ = _state(config, 1)
  fresh = nnx.to_flat_state(nnx.state(model))
  copied = state_lib.init_backbone_from(model, str(tmp_path / "pretrained"))
  src = dict(nnx.to_flat_state(nnx.state(source)))
  now = dict(nnx.to_flat_state(nnx.state(model)))
  heads = 0
  for path, var in fresh:
    is_head = any(str(p).startswith("tformer") for p in path)
    want = var.get_value() if is_head else src[path].get_value()
    np.testing.assert_array_equal(now[path].get_value(), want)
    heads += is_head
  assert heads == 2 and copied == len(fresh) - heads
  # A different backbone is refused with the offending variable named.
  config.model.backbone = "resnet18"
  _, other, _ = _state(config, 1)
  with pytest.raises(ValueError, match="init_from"):
    state_lib.init_backbone_from(other, str(tmp_path / "pretrained"))
