"""Shared test helpers: tiny demo datasets and fake episodes."""

import pathlib

import numpy as np

from ctx_jax.demo import dataset as demo_dataset
from ctx_jax.demo import glyphs

TINY_DEMO = glyphs.DemoConfig(num_classes=16, num_valid_classes=5,
                                 num_test_classes=5, images_per_class=16,
                                 image_size=32, seed=3)


def make_tiny_demo(root: pathlib.Path, name: str = "glyphs") -> pathlib.Path:
  """Writes a tiny demo dataset to `root/name` (once) and returns the path."""
  path = root / name
  if not (path / "dataset_spec.json").exists():
    demo_dataset.generate_dataset(str(path), TINY_DEMO)
  return path


def fake_episode(num_support: int, num_query: int, ways: int,
                 image_size: int = 32, real_support: int | None = None,
                 real_query: int | None = None, seed: int = 0):
  """A random padded episode; labels cycle over `ways` classes."""
  rng = np.random.default_rng(seed)
  real_support = num_support if real_support is None else real_support
  real_query = num_query if real_query is None else real_query

  def part(n, real):
    labels = np.where(np.arange(n) < real, np.arange(n) % ways, 0)
    return (rng.uniform(-1, 1, (n, image_size, image_size, 3))
            .astype(np.float32), labels.astype(np.int32), np.arange(n) < real)

  s_img, s_lab, s_mask = part(num_support, real_support)
  q_img, q_lab, q_mask = part(num_query, real_query)
  return {"support_images": s_img, "support_labels": s_lab,
          "support_mask": s_mask, "query_images": q_img,
          "query_labels": q_lab, "query_mask": q_mask}
