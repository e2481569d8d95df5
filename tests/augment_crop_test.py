"""The on-device crop samples boxes with TF's sample_distorted_bounding_box
distribution (as `meta_dataset_pipeline/simclr.py` calls it)."""

import jax
import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

from ctx_jax.data import augment

N = 3000  # Boxes per sampler and setting.
H, W = 40, 56  # Not square, so the aspect ratio range is scaled by W / H.


def _tf_boxes(area_range, ratio_range, h=H, w=W, n=N):
  """(y, x, height, width) of `n` TF boxes, with simclr.py's arguments."""
  out = []
  for i in range(n):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [h, w, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=[i, 7],
        min_object_covered=0.1, aspect_ratio_range=ratio_range,
        area_range=area_range, max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    out.append([int(begin[0]), int(begin[1]), int(size[0]), int(size[1])])
  return np.array(out)


def _jax_boxes(area_range, ratio_range, h=H, w=W, n=N, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  fn = jax.jit(jax.vmap(lambda k: augment.sample_crop_box(
      k, h, w, area_range, ratio_range)))
  return np.stack([np.asarray(v) for v in fn(keys)], axis=1)


def _old_boxes(area_range, ratio_range, h=H, w=W, n=N, seed=0):
  """The sampler this replaced: area uniform, log-uniform ratio, 10 tries."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    area = rng.uniform(*area_range, 10)
    ratio = np.exp(rng.uniform(np.log(ratio_range[0]),
                               np.log(ratio_range[1]), 10))
    ch = np.round(np.sqrt(area * h * w / ratio))
    cw = np.round(np.sqrt(area * h * w * ratio))
    fits = (ch >= 1) & (cw >= 1) & (ch <= h) & (cw <= w)
    i = int(np.argmax(fits))
    ch, cw = (ch[i], cw[i]) if fits[i] else (h, w)
    out.append([int(rng.uniform() * (h - ch + 1)),
                int(rng.uniform() * (w - cw + 1)), ch, cw])
  return np.array(out)


def _same_distribution_p(a, b, bins=12):
  """Chi-square two-sample test on quantile bins of the pooled values."""
  edges = np.unique(np.quantile(np.concatenate([a, b]),
                                np.linspace(0, 1, bins + 1)))
  edges[-1] += 1
  table = np.stack([np.histogram(a, edges)[0], np.histogram(b, edges)[0]])
  table = table[:, table.sum(0) > 0]
  return stats.chi2_contingency(table).pvalue


@pytest.mark.parametrize("area_range, ratio_range", [
    ((0.08, 1.0), (3 / 4 * W / H, 4 / 3 * W / H)),  # SimCLR.
    ((0.25, 1.0), (3 / 4 * W / H, 4 / 3 * W / H)),  # Our BOHB reading.
    ((0.02, 0.3), (0.5, 2.0)),  # min_object_covered=0.1 cuts small boxes.
])
def test_crop_box_distribution_matches_tf(area_range, ratio_range):
  ours = _jax_boxes(area_range, ratio_range)
  theirs = _tf_boxes(area_range, ratio_range)
  assert np.all(ours[:, 0] + ours[:, 2] <= H)
  assert np.all(ours[:, 1] + ours[:, 3] <= W)
  names = ("y", "x", "height", "width")
  # Fixed seeds: the p-values are deterministic, not flaky.
  for i, name in enumerate(names):
    p = _same_distribution_p(ours[:, i], theirs[:, i])
    assert p > 1e-3, (name, p)
  area = lambda b: b[:, 2] * b[:, 3] / (H * W)
  assert _same_distribution_p(area(ours), area(theirs)) > 1e-3
  # Exactly TF's support: the same set of box sizes can occur.
  sizes = lambda b: set(map(tuple, b[:, 2:]))
  assert len(sizes(ours) ^ sizes(theirs)) <= 0.1 * len(sizes(theirs))
  assert area(ours).min() >= 0.1 - 1e-6 and area(theirs).min() >= 0.1 - 1e-6


def test_the_test_rejects_the_old_sampler():
  area_range, ratio_range = (0.08, 1.0), (3 / 4 * W / H, 4 / 3 * W / H)
  theirs = _tf_boxes(area_range, ratio_range)
  old = _old_boxes(area_range, ratio_range)
  assert _same_distribution_p(old[:, 2], theirs[:, 2]) < 1e-6


def test_fallback_is_the_whole_image():
  # No box of area >= 0.9 with width/height in [3, 4] fits a square image:
  # after 100 failed attempts TF returns the whole image, and so do we.
  ours = _jax_boxes((0.9, 1.0), (3.0, 4.0), h=32, w=32, n=50)
  theirs = _tf_boxes((0.9, 1.0), (3.0, 4.0), h=32, w=32, n=50)
  np.testing.assert_array_equal(ours, [[0, 0, 32, 32]] * 50)
  np.testing.assert_array_equal(theirs, ours)
