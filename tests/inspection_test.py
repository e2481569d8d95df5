"""models.inspect_episode: attention, prototypes and logits of the CTX head.

Shape letters: Q queries, P (y, x) query positions, S support images, J
support positions, W ways, C value channels.
"""

from flax import nnx
import numpy as np
import pytest

from ctx_jax import models
from tests.models_test import BASE_LABELS
from tests.models_test import BASE_WAYS
from tests.models_test import forward
from tests.models_test import make_episode
from tests.models_test import pad_episode
from tests.models_test import random_model
from tests.models_test import tiny_config


@pytest.fixture(scope='module')
def model():
  return random_model(tiny_config(), seed=5)


@pytest.fixture(scope='module')
def episode():
  # Garbage padded rows whose labels hit every class; class 3 is absent.
  return pad_episode(make_episode(1, BASE_LABELS, 3), 11, 4, BASE_WAYS)


def recomputed_logits(out):
  """Logits from attention @ values by hand: prototypes, distances."""
  q, h, w, s = out.attention.shape[:4]
  att = out.attention.reshape((q, h * w, s, h * w))
  values = out.support_values.reshape((s, h * w, -1))
  num_ways = out.logits.shape[1]
  onehot = (out.support_labels[:, None] == np.arange(num_ways)
            ) & out.support_mask[:, None]  # [S,W]
  prototypes = np.einsum('qpsj,sjc,sw->qwpc', att.astype(np.float64),
                         values, onehot)
  query_values = out.query_values.reshape((q, 1, h * w, -1))
  distances = np.sum((query_values - prototypes) ** 2, axis=(2, 3)) / (h * w)
  return prototypes.reshape(out.prototypes.shape), distances


def test_attention_is_a_softmax_per_class_and_gives_the_head_logits(
    model, episode):
  out = models.inspect_episode(model, episode, num_ways=BASE_WAYS)
  q, h, w, s = out.attention.shape[:4]
  assert out.attention.shape == (q, h, w, s, h, w) == (4, 6, 6, 11, 6, 6)
  assert out.logits.shape == out.distances.shape == (4, BASE_WAYS)
  assert out.prototypes.shape == (4, BASE_WAYS, 6, 6, 16)
  assert out.support_embeddings.shape == (11, 6, 6, 128)
  assert np.all(out.attention >= 0)
  # Per class, over the positions of its real support images: one.
  per_image = out.attention.sum(axis=(4, 5))  # [Q,h,w,S]
  mask = episode['support_mask']
  assert np.all(per_image[..., ~mask] == 0)
  for c in range(3):
    rows = mask & (episode['support_labels'] == c)
    np.testing.assert_allclose(per_image[..., rows].sum(-1), 1.0, rtol=1e-5)
  # The logits are the model's own (eval mode, the default).
  model.eval()
  try:
    expected = np.asarray(forward(model, episode, num_ways=BASE_WAYS))
  finally:
    model.train()
  np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-5)
  assert np.all(out.logits[:, 3] == models.ABSENT_CLASS_LOGIT)
  np.testing.assert_array_equal(out.predictions, expected.argmax(-1))
  # attention @ values reproduces the prototypes, distances and logits.
  prototypes, distances = recomputed_logits(out)
  np.testing.assert_allclose(out.prototypes[:, :3], prototypes[:, :3],
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(-distances[:, :3], out.logits[:, :3],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.distances[:, :3], distances[:, :3],
                             rtol=1e-4, atol=1e-4)


def test_train_mode_uses_support_statistics_and_leaves_the_model(
    model, episode):
  before = {p: np.asarray(v[...]) for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  out = models.inspect_episode(model, episode, num_ways=BASE_WAYS,
                               train_mode=True)
  after = {p: np.asarray(v[...]) for p, v in
           nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value)
  expected = np.asarray(forward(nnx.clone(model), episode,
                                num_ways=BASE_WAYS))
  np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_num_ways_defaults_and_bad_inputs(model, episode):
  small = {k: episode[k] for k in ('support_images', 'support_labels',
                                   'support_mask')}
  small['query_images'] = episode['query_images'][:1]
  assert models.inspect_episode(model, small).logits.shape == (1, 3)
  with pytest.raises(ValueError, match=r'support labels must be in \[0, 2\)'):
    models.inspect_episode(model, small, num_ways=2)
  protonet = random_model(tiny_config(head='protonet'))
  with pytest.raises(ValueError, match='CrossTransformer'):
    models.inspect_episode(protonet, small)
