"""See what a CTX model does with an episode: embeddings, attention, logits.

  from ctx_jax import models
  out = models.inspect_episode(model, episode)
  out.attention[q, y, x, s]   # [h,w] map over support image s

`inspect_episode` runs the model's own backbone (`EpisodicModel.embed`) and
its head's `attention` method, which calls the same functions as the
training head (`crosstransformer._aligned_prototypes`); nothing here
re-implements the attention. The whole attention [Q,P,S,J] is materialised,
so pass the few queries to look at (batch norm is not transductive: the
other queries do not change their results).

Shape letters: S support images, Q query images, W ways, h and w the feature
map's height and width (P = J = h*w positions), E embedding channels, C value
channels.
"""

import dataclasses
from typing import Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ctx_jax.models import crosstransformer
from ctx_jax.models import learner


@dataclasses.dataclass(frozen=True)
class Inspection:
  """Everything the model computes for an episode, as numpy arrays.

  Attributes:
    support_embeddings: [S,h,w,E] backbone features.
    query_embeddings: [Q,h,w,E].
    support_values: [S,h,w,C] support features under the value projection.
    query_values: [Q,h,w,C].
    attention: [Q,h,w,S,h,w]: weight of query position (y, x) on position
      (y', x') of support image s. For each class c, the weights over the
      positions of the real support images of class c sum to one (a softmax
      per class); padded support rows get 0.
    prototypes: [Q,W,h,w,C] query-aligned prototypes: prototypes[q, c, y, x]
      is the attention-weighted sum of the class-c support values.
    distances: [Q,W] mean over query positions of |query value -
      prototype|^2 (summed over channels).
    logits: [Q,W] float32: minus the distances, ABSENT_CLASS_LOGIT for
      classes without support; exactly what the model's head returns.
    support_labels: [S] int32 as passed (padded rows: 0).
    support_mask: [S] bool.
  """
  support_embeddings: np.ndarray
  query_embeddings: np.ndarray
  support_values: np.ndarray
  query_values: np.ndarray
  attention: np.ndarray
  prototypes: np.ndarray
  distances: np.ndarray
  logits: np.ndarray
  support_labels: np.ndarray
  support_mask: np.ndarray

  @property
  def predictions(self) -> np.ndarray:
    """[Q] int: the predicted class of each query (argmax of the logits)."""
    return np.argmax(self.logits, axis=-1)

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


@nnx.jit(static_argnames='num_ways')
def _forward(model, support_images, support_labels, support_mask,
             query_images, num_ways):
  support_emb, query_emb = model.embed(support_images, support_mask,
                                       query_images)
  out = model.head.attention(support_emb, support_labels, support_mask,
                             query_emb, num_ways=num_ways)
  return support_emb, query_emb, out


def episode_num_ways(episode: Mapping[str, np.ndarray]) -> int:
  """The episode's `num_ways`, else 1 + the largest real support label."""
  if 'num_ways' in episode:
    return int(episode['num_ways'])
  labels = np.asarray(episode['support_labels'])
  mask = np.asarray(episode.get('support_mask', np.ones(labels.shape, bool)))
  return int(np.max(labels[mask])) + 1


def inspect_episode(model: learner.EpisodicModel,
                    episode: Mapping[str, np.ndarray],
                    num_ways: int | None = None,
                    train_mode: bool = False) -> Inspection:
  """Runs a CTX model on an episode and returns its intermediates.

  Args:
    model: an `EpisodicModel` with a CrossTransformer head. It is not
      changed (a copy is run, so train mode does not update its batch-norm
      statistics).
    episode: `support_images` [S,H,X,3] in [-1, 1], `support_labels` [S],
      `query_images` [Q,H,X,3], and optionally `support_mask` [S] (default
      all True) and `num_ways`.
    num_ways: logit columns W (default: `episode_num_ways`).
    train_mode: batch norm with the support set's statistics (as in
      training) instead of the EMA statistics (as in evaluation, default).

  Returns:
    An `Inspection`, arrays on the host.
  """
  if not isinstance(model.head, crosstransformer.CrossTransformerHead):
    raise ValueError('inspect_episode needs a CrossTransformer (ctx) head; '
                     f'this model has a {type(model.head).__name__}')
  labels = np.asarray(episode['support_labels'], np.int32)
  mask = np.asarray(episode.get('support_mask', np.ones(labels.shape, bool)),
                    bool)
  num_ways = episode_num_ways(episode) if num_ways is None else num_ways
  real = labels[mask]
  if real.size and (real.min() < 0 or real.max() >= num_ways):
    raise ValueError(f'support labels must be in [0, {num_ways}); got '
                     f'{sorted(set(real.tolist()))}')
  model = nnx.clone(model)
  model.train() if train_mode else model.eval()  # pylint: disable=expression-not-assigned
  support_emb, query_emb, out = _forward(
      model, jnp.asarray(episode['support_images']), jnp.asarray(labels),
      jnp.asarray(mask), jnp.asarray(episode['query_images']),
      num_ways=num_ways)
  out = jax.device_get(out)
  support_emb, query_emb = np.asarray(support_emb), np.asarray(query_emb)
  s, h, w = support_emb.shape[:3]
  q = query_emb.shape[0]
  spatial = lambda x, n: np.asarray(x).reshape((n, h, w, -1))
  return Inspection(
      support_embeddings=support_emb, query_embeddings=query_emb,
      support_values=spatial(out['support_values'], s),
      query_values=spatial(out['query_values'], q),
      attention=np.asarray(out['attention']).reshape((q, h, w, s, h, w)),
      prototypes=np.asarray(out['prototypes']).reshape(
          (q, num_ways, h, w, -1)),
      distances=np.asarray(out['distances']),
      logits=np.asarray(out['logits']),
      support_labels=labels, support_mask=mask)
