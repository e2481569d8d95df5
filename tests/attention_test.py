"""ctx-attention figures, and attention images in TensorBoard at validation."""

import pathlib

from matplotlib import image as mpimg
import numpy as np
import pytest
import tensorflow as tf

from ctx_jax.eval import attention_main
from ctx_jax.eval import figures
from ctx_jax.checkpoints import official_cli
from ctx_jax.checkpoints import export as checkpoint
from ctx_jax.training import train
from experiments import demo
from tests import fakes
from tests.models_test import forward
from tests.models_test import random_model


def _tiny_demo_config():
  config = demo.get_config("smoke")
  config.model.query_dim = 16
  config.model.val_dim = 16
  return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Tiny demo records and a demo-like export (resnet_tiny, random)."""
  root = tmp_path_factory.mktemp("attention")
  records = fakes.make_tiny_demo(root / "data")
  config = _tiny_demo_config()
  export = checkpoint.export_model(root / "export",
                                   random_model(config.model, seed=2),
                                   config.model)
  return records, export, config


def _attention_main(*args):
  assert attention_main.main([str(a) for a in args]) == 0


def _check_attention(npz, num_queries):
  """Per class and query position, the attention over its support sums to 1."""
  with np.load(npz) as data:
    out = dict(data)
  assert out["attention"].shape[0] == num_queries
  per_image = out["attention"].sum(axis=(4, 5))  # [Q,h,w,S]
  labels, mask = out["support_labels"], out["support_mask"]
  assert np.all(per_image[..., ~mask] == 0)
  for c in range(out["logits"].shape[1]):
    rows = mask & (labels == c)
    if rows.any():
      np.testing.assert_allclose(per_image[..., rows].sum(-1), 1.0,
                                 rtol=1e-5)
  return out


def _png_shape(path):
  return mpimg.imread(path).shape


def test_figures_from_records_of_a_demo_export(tiny, tmp_path):
  records, export, config = tiny
  out_dir = tmp_path / "out"
  _attention_main("--model_dir", export, "--records", records, "--split",
                  "TEST", "--seed", "3", "--image_size",
                  config.data.image_size, "--num_ways", 3, "--num_support",
                  2, "--queries", "2", "--grid", 2, "--max_support", 2,
                  "--output", out_dir)
  # 32x32 images at stride 8: 4x4 feature maps, a 2x2 grid at (1|3, 1|3).
  names = sorted(p.name for p in out_dir.iterdir())
  expected = [f"query2_y{y}_x{x}.png" for y in (1, 3) for x in (1, 3)]
  assert names == sorted(expected + ["attention.npz", "summary.png"])
  height, width = figures.figure_shape(3, 2)
  for name in expected:
    assert _png_shape(out_dir / name) == (height, width, 4)
  summary = _png_shape(out_dir / "summary.png")
  assert summary[0] > 100 and summary[1] > 100
  out = _check_attention(out_dir / "attention.npz", 1)
  assert out["attention"].shape[1:3] == (4, 4)
  np.testing.assert_array_equal(out["query_indices"], [2])


def test_npz_episode_gives_the_model_logits(tiny, tmp_path):
  _, export, _ = tiny
  episode = fakes.fake_episode(6, 4, 3, image_size=32, real_support=5)
  del episode["query_mask"]
  np.savez(tmp_path / "episode.npz", **episode)
  _attention_main("--model_dir", export, "--episode",
                  tmp_path / "episode.npz", "--queries", "1,3",
                  "--positions", "0,0;2,1", "--output", tmp_path / "out")
  assert (tmp_path / "out" / "query3_y2_x1.png").is_file()
  out = _check_attention(tmp_path / "out" / "attention.npz", 2)
  model, _ = checkpoint.load_exported_model(export)
  model.eval()
  logits = np.asarray(forward(model, episode, num_ways=3))
  np.testing.assert_allclose(out["logits"], logits[[1, 3]], rtol=1e-5,
                             atol=1e-5)


def test_imported_official_checkpoint(shared_dir, tmp_path):
  fixture = shared_dir / "fixtures" / "official_ctx"
  export = tmp_path / "official"
  official_cli.run([str(fixture / "model.ckpt"), str(export)])
  _attention_main("--model_dir", export, "--episode", fixture / "episode.npz",
                  "--queries", "0,8", "--positions", "2,3",
                  "--output", tmp_path / "out")
  with np.load(fixture / "expected.npz") as expected:
    official = expected["logits_eval"]
  out = _check_attention(tmp_path / "out" / "attention.npz", 2)
  assert out["attention"].shape == (2, 6, 6, 13, 6, 6)
  # The official code's eval logits (same tolerance as the fixture test).
  np.testing.assert_allclose(out["logits"], official[[0, 8]], rtol=0,
                             atol=2e-4)
  for q in (0, 8):
    assert _png_shape(tmp_path / "out" / f"query{q}_y2_x3.png") == (
        figures.figure_shape(5, 6) + (4,))


def _error(capsys, *args):
  with pytest.raises(SystemExit) as e:
    attention_main.main([str(a) for a in args])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("ctx-attention: error: ") and err.count("\n") == 1
  return err


def test_user_errors(tiny, tmp_path, capsys):
  _, export, _ = tiny
  episode = fakes.fake_episode(4, 2, 2, image_size=32)
  np.savez(tmp_path / "episode.npz", **episode)
  np.savez(tmp_path / "bad.npz", support_images=episode["support_images"])
  common = ("--model_dir", export, "--episode", tmp_path / "episode.npz")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  assert "busy exists and is not an empty folder" in _error(
      capsys, *common, "--output", busy)
  assert (busy / "keep.txt").read_text() == "mine"
  assert "--queries [5]: the episode has 2 queries" in _error(
      capsys, *common, "--queries", "0,5", "--output", tmp_path / "o1")
  assert "outside the 4x4 feature map" in _error(
      capsys, *common, "--positions", "1,4", "--output", tmp_path / "o2")
  assert not (tmp_path / "o2").exists()
  assert "bad.npz lacks support_labels, query_images" in _error(
      capsys, "--model_dir", export, "--episode", tmp_path / "bad.npz",
      "--output", tmp_path / "o3")
  assert "does not exist" in _error(
      capsys, "--model_dir", tmp_path / "nowhere", *common[2:], "--output",
      tmp_path / "o4")
  assert "one of the arguments --episode --records is required" in _error(
      capsys, "--model_dir", export, "--output", tmp_path / "o5")
  protonet = checkpoint.export_model(
      tmp_path / "protonet", random_model(_protonet_config(), seed=1),
      _protonet_config())
  assert "needs a CrossTransformer (ctx) head" in _error(
      capsys, "--model_dir", protonet, *common[2:], "--output",
      tmp_path / "o6")


def _protonet_config():
  config = _tiny_demo_config().model
  config.head = "protonet"
  return config


def _image_tags(workdir: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{tag: (height, width)} of the image summaries in the TB event files."""
  tags = {}
  for path in workdir.glob("events.out.tfevents.*"):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "images":
          width, height = value.tensor.string_val[:2]
          tags[value.tag] = (int(height), int(width))
  return tags


@pytest.mark.parametrize("enabled", [True, False])
def test_validation_writes_attention_images_when_enabled(tiny, tmp_path,
                                                        enabled):
  records = tiny[0]
  config = _tiny_demo_config()
  config.data.records_root = str(records.parent)
  config.num_devices = 2
  config.train.num_steps = 2
  config.eval.num_episodes = 1
  config.eval.attention_images = enabled
  train.train_and_evaluate(config, str(tmp_path / "run"))
  tags = _image_tags(tmp_path / "run")
  if not enabled:
    assert not tags
    return
  assert set(tags) == {"valid/glyphs/attention", "valid/glyphs/confusion"}
  assert tags["valid/glyphs/attention"] == figures.figure_shape(2, 6)
