"""Non-learned baselines evaluated on exactly the episodes a model sees.

`pixel_nearest_neighbour` classifies each query by its nearest support image
in raw pixel space (squared Euclidean). It tells how much of a dataset is
solvable without learning anything, which is the yardstick for the demo.
"""

from typing import Mapping

import numpy as np


def pixel_nearest_neighbour(episode: Mapping[str, np.ndarray]
                            ) -> dict[str, float]:
  """1-NN accuracy on raw pixels for one (possibly padded) episode.

  Args:
    episode: numpy episode dict (support/query images, labels, masks).

  Returns:
    {"accuracy": fraction of real queries whose nearest real support image
    has the same label}.
  """
  s_mask = np.asarray(episode["support_mask"], bool)
  q_mask = np.asarray(episode["query_mask"], bool)
  support = np.asarray(episode["support_images"])[s_mask]
  query = np.asarray(episode["query_images"])[q_mask]
  support = support.reshape(len(support), -1).astype(np.float64)
  query = query.reshape(len(query), -1).astype(np.float64)
  # |q - s|^2 = |q|^2 - 2 q.s + |s|^2; |q|^2 is constant per query.
  dist = (np.sum(support**2, axis=1)[None, :] - 2.0 * query @ support.T)
  nearest = np.argmin(dist, axis=1)
  predicted = np.asarray(episode["support_labels"])[s_mask][nearest]
  labels = np.asarray(episode["query_labels"])[q_mask]
  return {"accuracy": float(np.mean(predicted == labels))}
