"""Non-learned baselines evaluated on exactly the episodes a model sees.

Each baseline maps one (possibly padded) numpy episode to `{"accuracy": ...}`
over its real queries, so `evaluate.source_accuracies(..., baseline=...)`
runs it on the pipeline's episodes and `episodic.summarize` gives the same
statistics as for a model. They tell how much of a dataset is solvable
without learning anything, which is the yardstick for the demo:

* `nearest_neighbour`: each query takes the label of its nearest support
  image (squared Euclidean); `pixel_nearest_neighbour` on raw pixels.
* `nearest_class_mean`: the nearest class mean of the support features.
* features: raw pixels (None), `grey_abs_zscore` (colour- and
  polarity-free pixels) or `hog_features` (a hand-made shape feature).
"""

import math
from typing import Callable, Mapping

import numpy as np

Features = Callable[[np.ndarray], np.ndarray] | None


def _real(episode: Mapping[str, np.ndarray], features: Features):
  """Real support/query rows as float64 feature vectors, and their labels."""
  s_mask = np.asarray(episode["support_mask"], bool)
  q_mask = np.asarray(episode["query_mask"], bool)
  support = np.asarray(episode["support_images"])[s_mask]
  query = np.asarray(episode["query_images"])[q_mask]
  if features is not None:
    support, query = features(support), features(query)
  support = support.reshape(len(support), -1).astype(np.float64)
  query = query.reshape(len(query), -1).astype(np.float64)
  return (support, np.asarray(episode["support_labels"])[s_mask], query,
          np.asarray(episode["query_labels"])[q_mask])


def _sq_distances(query: np.ndarray, support: np.ndarray) -> np.ndarray:
  # |q - s|^2 = |q|^2 - 2 q.s + |s|^2; |q|^2 is constant per query.
  return np.sum(support**2, axis=1)[None, :] - 2.0 * query @ support.T


def nearest_neighbour(episode: Mapping[str, np.ndarray],
                      features: Features = None) -> dict[str, float]:
  """1-NN accuracy of the real queries of one episode."""
  support, s_labels, query, q_labels = _real(episode, features)
  predicted = s_labels[np.argmin(_sq_distances(query, support), axis=1)]
  return {"accuracy": float(np.mean(predicted == q_labels))}


def nearest_class_mean(episode: Mapping[str, np.ndarray],
                       features: Features = None) -> dict[str, float]:
  """Nearest-class-mean accuracy of the real queries of one episode."""
  support, s_labels, query, q_labels = _real(episode, features)
  classes = np.unique(s_labels)
  means = np.stack([support[s_labels == c].mean(0) for c in classes])
  predicted = classes[np.argmin(_sq_distances(query, means), axis=1)]
  return {"accuracy": float(np.mean(predicted == q_labels))}


def pixel_nearest_neighbour(episode: Mapping[str, np.ndarray]
                            ) -> dict[str, float]:
  """1-NN on raw pixels: the baseline `ctx-eval --model pixels` reports."""
  return nearest_neighbour(episode)


def grey_abs_zscore(images: np.ndarray) -> np.ndarray:
  """Grey levels, z-scored per image, absolute value: colour/polarity-free.

  Glyph strokes are the outliers of an image's grey-level distribution
  whatever their colour, so |z| maps them to high values on either polarity.
  """
  grey = images.mean(-1)
  z = (grey - grey.mean((1, 2), keepdims=True)) / (
      grey.std((1, 2), keepdims=True) + 1e-6)
  return np.abs(z)


def hog_features(images: np.ndarray, cell: int = 6,
                 bins: int = 9) -> np.ndarray:
  """HOG-like gradient-orientation histograms (numpy).

  Invariant to colour and polarity (grey levels, unsigned orientations) and
  to local contrast (block normalisation), and tolerant to small shifts
  (cell pooling): a hand-made shape feature.

  Args:
    images: [N, H, W, C] images (the rows and columns past the last whole
      cell are left out).
    cell: cell side in pixels.
    bins: orientation bins over [0, pi).

  Returns:
    [N, D] L2-normalised features.
  """
  gray = np.asarray(images, np.float32).mean(-1)
  gy, gx = np.gradient(gray, axis=(1, 2))
  mag = np.hypot(gx, gy)
  pos = (np.arctan2(gy, gx) % math.pi) / math.pi * bins
  lo = np.floor(pos).astype(int) % bins
  frac = pos - np.floor(pos)
  n, h, w = gray.shape
  hist = np.zeros((n, h, w, bins), np.float32)
  # Linear vote between the two nearest orientation bins.
  np.put_along_axis(hist, lo[..., None], (mag * (1 - frac))[..., None], -1)
  hi = (lo + 1) % bins
  hist += np.eye(bins, dtype=np.float32)[hi] * (mag * frac)[..., None]
  rows, cols = h // cell, w // cell
  hist = hist[:, :rows * cell, :cols * cell].reshape(
      n, rows, cell, cols, cell, bins).sum((2, 4))
  # 2x2-cell blocks, L2-Hys normalised.
  blocks = np.concatenate([hist[:, :-1, :-1], hist[:, 1:, :-1],
                           hist[:, :-1, 1:], hist[:, 1:, 1:]], -1)
  blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True) + 1e-6
  blocks = np.minimum(blocks, 0.2)
  blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True) + 1e-6
  feats = blocks.reshape(n, -1)
  return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-6)
