"""Tests of ctx_jax.models on small (resnet_tiny) configs, all under jit.

Shape letters: S support, Q queries, W ways, P query positions, J support
positions, D key channels, C value channels.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctx_jax import models
from ctx_jax.checkpoints import official as official_import

SIZE = 48  # resnet_tiny with max_stride 8 gives 6x6 feature maps.


def tiny_config(**overrides):
  config = models.default_model_config()
  config.backbone = 'resnet_tiny'
  config.max_stride = 8
  config.query_dim = 16
  config.val_dim = 16
  config.query_chunk_size = 4
  config.init = 'he'
  config.update(overrides)
  return config


def make_episode(seed, support_labels, num_query, size=SIZE):
  """Random images in [-1, 1] with the given support labels."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(support_labels, np.int32)
  num_ways = int(labels.max()) + 1
  return dict(
      support_images=rng.uniform(-1, 1, (len(labels), size, size, 3)
                                 ).astype(np.float32),
      support_labels=labels,
      support_mask=np.ones(len(labels), bool),
      query_images=rng.uniform(-1, 1, (num_query, size, size, 3)
                               ).astype(np.float32),
      query_labels=rng.integers(0, num_ways, num_query).astype(np.int32))


def pad_episode(ep, num_support, num_query, num_ways, seed=7):
  """Pads with garbage masked rows; padded support labels hit every class."""
  rng = np.random.default_rng(seed)
  s, q = len(ep['support_labels']), len(ep['query_labels'])
  junk = lambda n: rng.normal(0, 3, (n,) + ep['support_images'].shape[1:])
  return dict(
      support_images=np.concatenate(
          [ep['support_images'], junk(num_support - s)]).astype(np.float32),
      support_labels=np.concatenate([
          ep['support_labels'],
          np.arange(num_support - s) % num_ways]).astype(np.int32),
      support_mask=np.arange(num_support) < s,
      query_images=np.concatenate(
          [ep['query_images'], junk(num_query - q)]).astype(np.float32),
      query_labels=np.concatenate(
          [ep['query_labels'], np.zeros(num_query - q)]).astype(np.int32),
      query_mask=np.arange(num_query) < q)


@nnx.jit(static_argnames='num_ways')
def forward(model, ep, num_ways):
  return model(ep['support_images'], ep['support_labels'],
               ep['support_mask'], ep['query_images'], num_ways=num_ways)


@nnx.jit(static_argnames='num_ways')
def loss_and_grads(model, ep, num_ways):
  """Masked mean cross-entropy over real queries, and its gradients."""

  def loss_fn(model):
    logits = model(ep['support_images'], ep['support_labels'],
                   ep['support_mask'], ep['query_images'], num_ways=num_ways)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits),
                               ep['query_labels'][:, None], axis=1)[:, 0]
    mask = ep.get('query_mask', jnp.ones_like(nll, bool))
    return jnp.sum(jnp.where(mask, nll, 0)) / jnp.sum(mask), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, logits, grads


def flat(state):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


BASE_LABELS = [1, 0, 2, 2, 0, 1, 0, 2]  # S=8; class 3 of W=4 is absent.
BASE_WAYS = 4


def random_model(config, seed=0):
  """A model with He-scaled random kernels drawn by numpy.

  Skips JAX's random init, whose per-shape compilation dominates the run
  time of these small tests (kernel_init is tested on its own).
  """
  model = nnx.eval_shape(lambda: models.build_model(config,
                                                    rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  values = {}
  for name, shape in official_import.official_shapes(model).items():
    if name.endswith('/weight'):
      values[name] = rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape)
    elif name.endswith(('/scale', '/var_ema')):
      values[name] = rng.uniform(0.8, 1.2, shape)
    else:
      values[name] = rng.normal(0, 0.1, shape)
  official_import.assign_official_weights(model, values)
  return model


@pytest.fixture(scope='module')
def tiny_model():
  return random_model(tiny_config())


@pytest.fixture(scope='module')
def base_episode():
  return make_episode(0, BASE_LABELS, 5)


def test_logits_shape_dtype_and_absent_classes(tiny_model, base_episode):
  tiny_model.eval()
  logits = forward(tiny_model, base_episode, num_ways=BASE_WAYS)
  assert logits.shape == (5, 4) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits[:, 3], models.ABSENT_CLASS_LOGIT)
  assert np.all(np.isfinite(logits)) and np.all(logits[:, :3] > -1e8)


def test_bn_stats_update_in_train_mode_only(tiny_model, base_episode):
  model = nnx.clone(tiny_model)
  before = flat(nnx.state(model, nnx.BatchStat))
  model.eval()
  forward(model, base_episode, num_ways=BASE_WAYS)
  after_eval = flat(nnx.state(model, nnx.BatchStat))
  for path, value in before.items():
    np.testing.assert_array_equal(after_eval[path], value)
  model.train()
  loss_and_grads(model, base_episode, num_ways=BASE_WAYS)
  after_train = flat(nnx.state(model, nnx.BatchStat))
  # The first BN: ema = 0.9 * ema + 0.1 * mean over the support set only.
  conv1 = lambda x: jax.lax.conv_general_dilated(
      x, model.backbone.conv1.weight[...], (2, 2), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  mean = np.mean(np.asarray(conv1(base_episode['support_images'])),
                 axis=(0, 1, 2))
  path = ('backbone', 'conv1', 'batch_norm', 'mean_ema')
  np.testing.assert_allclose(after_train[path],
                             0.9 * before[path] + 0.1 * mean, rtol=1e-4,
                             atol=1e-6)
  for path, value in before.items():
    assert not np.allclose(after_train[path], value), path


def test_padding_invariance(tiny_model, base_episode):
  padded = pad_episode(base_episode, num_support=13, num_query=9, num_ways=6)
  results = []
  for episode, ways in ((base_episode, BASE_WAYS), (padded, 6)):
    model = nnx.clone(tiny_model)
    model.train()
    loss, logits, grads = loss_and_grads(model, episode, num_ways=ways)
    results.append((loss, logits, flat(grads),
                    flat(nnx.state(model, nnx.BatchStat))))
  (loss, logits, grads, stats), (ploss, plogits, pgrads, pstats) = results
  np.testing.assert_allclose(plogits[:5, :4], logits, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(plogits[:, 3:], models.ABSENT_CLASS_LOGIT)
  np.testing.assert_allclose(ploss, loss, rtol=1e-5)
  for path, g in grads.items():
    scale = np.max(np.abs(g)) + 1e-6
    np.testing.assert_allclose(pgrads[path] / scale, g / scale, atol=2e-4,
                               err_msg=str(path))
  for path, s in stats.items():
    np.testing.assert_allclose(pstats[path], s, rtol=1e-4, atol=1e-5)


def test_support_permutation_and_relabelling(tiny_model, base_episode):
  ep = base_episode
  tiny_model.eval()
  logits = np.asarray(forward(tiny_model, ep, num_ways=BASE_WAYS))
  # Any permutation of the support set (so within each class too).
  perm = np.array([6, 4, 2, 3, 1, 5, 0, 7])
  shuffled = dict(ep, support_images=ep['support_images'][perm],
                  support_labels=ep['support_labels'][perm])
  np.testing.assert_allclose(forward(tiny_model, shuffled, num_ways=4),
                             logits, rtol=1e-5, atol=1e-5)
  # Renaming class k to relabel[k] moves logit column k to relabel[k].
  relabel = np.array([2, 3, 1, 0])
  renamed = dict(ep, support_labels=relabel[ep['support_labels']])
  np.testing.assert_allclose(
      np.asarray(forward(tiny_model, renamed, num_ways=4))[:, relabel],
      logits, rtol=1e-5, atol=1e-5)


def random_head_inputs(seed, num_support, num_query, num_ways):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  queries = normal(num_query, 9, 8)  # [Q,P,D]
  query_values = normal(num_query, 9, 6)  # [Q,P,C]
  support_keys = normal(num_support, 4, 8)  # [S,J,D]
  support_values = normal(num_support, 4, 6)  # [S,J,C]
  labels = np.arange(num_support) % (num_ways - 1)  # Last class absent.
  mask = np.arange(num_support) < num_support - 2  # Two padded rows.
  # Huge padded rows: exp of them would overflow if they were not masked
  # before the exp.
  support_keys[-2:] = 1e30
  return tuple(map(jnp.asarray, (queries, query_values, support_keys,
                                 support_values, labels, mask)))


@pytest.mark.parametrize('chunk_size', [1, 3, 7, 100])
def test_chunked_head_matches_naive(chunk_size):
  args = random_head_inputs(4, num_support=10, num_query=7, num_ways=4)
  weights = np.random.default_rng(5).normal(size=(7, 4)).astype(np.float32)

  def loss(fn, inputs):
    logits = fn(*inputs)
    return jnp.sum(jnp.where(logits > -1e8, logits, 0) * weights), logits

  chunked = lambda *a: models.crosstransformer_logits(
      *a, num_ways=4, chunk_size=chunk_size)
  naive = lambda *a: models.crosstransformer_logits_naive(*a, num_ways=4)
  grad_fn = lambda fn: jax.jit(jax.grad(
      lambda x: loss(fn, x[:4] + args[4:]), has_aux=True))
  grads, logits = grad_fn(chunked)(args[:4])
  naive_grads, naive_logits = grad_fn(naive)(args[:4])
  np.testing.assert_allclose(logits, naive_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(logits[:, 3], models.ABSENT_CLASS_LOGIT)
  for g, ng in zip(grads, naive_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, ng, rtol=1e-4, atol=1e-5)
  # Padded support rows get exactly zero gradient.
  np.testing.assert_array_equal(grads[2][-2:], 0)


def test_head_matches_a_direct_transcription():
  queries, query_values, keys, values, labels, mask = random_head_inputs(
      6, num_support=6, num_query=2, num_ways=3)
  logits = jax.jit(functools.partial(
      models.crosstransformer_logits, num_ways=3, chunk_size=2))(
          queries, query_values, keys, values, labels, mask)
  q, qv, k, v = map(np.float64, (queries, query_values, keys, values))
  for c in range(2):
    rows = np.flatnonzero((np.asarray(labels) == c) & np.asarray(mask))
    kc, vc = k[rows].reshape(-1, 8), v[rows].reshape(-1, 6)  # [S_c*J, .]
    a = np.einsum('qpd,jd->qpj', q, kc) / np.sqrt(8)
    attn = np.exp(a - a.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    proto = np.einsum('qpj,jc->qpc', attn, vc)
    dist = np.sum((qv - proto) ** 2, axis=(1, 2)) / 9
    np.testing.assert_allclose(logits[:, c], -dist, rtol=1e-5)


def test_protonet_head(tiny_model, base_episode):
  model = nnx.eval_shape(lambda: models.build_model(
      tiny_config(head='protonet'), rngs=nnx.Rngs(0)))
  nnx.update(model.backbone, nnx.state(tiny_model.backbone))
  model.eval()
  ep = base_episode
  logits = np.asarray(forward(model, ep, num_ways=BASE_WAYS))
  support, query = nnx.jit(lambda m, e: m.embed(
      e['support_images'], e['support_mask'], e['query_images']))(model, ep)
  support, query = np.mean(support, (1, 2)), np.mean(query, (1, 2))
  labels = ep['support_labels']
  protos = np.stack([support[labels == c].mean(0) for c in range(3)])
  expected = -np.sum((query[:, None] - protos[None]) ** 2, -1)
  np.testing.assert_allclose(logits[:, :3], expected, rtol=1e-4, atol=1e-4)
  assert np.all(logits[:, 3] == models.ABSENT_CLASS_LOGIT)
  cosine = models.protonet_logits(
      jnp.asarray(support), labels, ep['support_mask'], jnp.asarray(query),
      num_ways=3, distance='cosine')
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(cosine, unit(query) @ unit(protos).T,
                             rtol=1e-4, atol=1e-5)


def test_weight_decay_sum_covers_conv_kernels_only(tiny_model):
  kernels = [v[...] for p, v in nnx.to_flat_state(nnx.state(tiny_model))
             if p[-1] == 'weight']
  # resnet_tiny: stem + 4 stages x (2 convs + 1 projection) + 2 projections.
  assert len(kernels) == 1 + 4 * 3 + 2
  expected = sum(float(jnp.sum(k ** 2)) for k in kernels)
  total = nnx.jit(models.weight_decay_sum)(tiny_model)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  for path, _ in nnx.to_flat_state(nnx.state(tiny_model, nnx.Param)):
    assert path[-1] in ('weight', 'scale', 'offset'), path


def test_bfloat16_close_to_float32(tiny_model, base_episode):
  low = nnx.eval_shape(lambda: models.build_model(
      tiny_config(dtype='bfloat16'), rngs=nnx.Rngs(0)))
  nnx.update(low, nnx.state(tiny_model))
  out = []
  for model in (nnx.clone(tiny_model), low):
    model.train()
    _, logits, grads = loss_and_grads(model, base_episode,
                                      num_ways=BASE_WAYS)
    out.append((logits, grads))
    assert logits.dtype == jnp.float32
    for p, g in nnx.to_flat_state(grads):
      assert g[...].dtype == jnp.float32 and np.all(np.isfinite(g[...])), p
  (logits, _), (low_logits, _) = out
  rel = (np.linalg.norm(low_logits[:, :3] - logits[:, :3]) /
         np.linalg.norm(logits[:, :3]))
  assert rel < 0.05, rel


def test_kernel_init():
  key = jax.random.key(0)
  official = np.asarray(models.backbone.kernel_init('official', key,
                                                    (3, 3, 32, 64)))
  assert official.dtype == np.float32
  assert np.max(np.abs(official)) <= 0.2  # Truncated at 2 std.
  # The std of a normal truncated at 2 std is 0.88 of the untruncated one.
  np.testing.assert_allclose(np.std(official), 0.088, rtol=0.05)
  he = np.asarray(models.backbone.kernel_init('he', key, (3, 3, 32, 64)))
  np.testing.assert_allclose(np.std(he), np.sqrt(2 / (9 * 32)), rtol=0.05)


def test_input_validation(tiny_model, base_episode):
  ep = base_episode
  # Shapes and dtypes: chex assertions at the model's boundary.
  with pytest.raises(AssertionError, match='prefix'):
    tiny_model(ep['support_images'], ep['support_labels'],
               ep['support_mask'][:1], ep['query_images'], num_ways=4)
  with pytest.raises(AssertionError, match='suffix'):
    tiny_model(ep['support_images'], ep['support_labels'],
               ep['support_mask'], ep['query_images'][:, :40], num_ways=4)
  with pytest.raises(ValueError, match='num_ways'):
    tiny_model(ep['support_images'], ep['support_labels'],
               ep['support_mask'], ep['query_images'], num_ways=0)
  with pytest.raises(ValueError, match='head'):
    models.build_model(tiny_config(head='matchingnet'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='init'):
    models.build_model(tiny_config(init='xavier'), rngs=nnx.Rngs(0))


def test_model_checks_episode_shapes_and_dtypes():
  # chex assertions at the model's boundary name the offending argument.
  model = models.build_model(tiny_config(), rngs=nnx.Rngs(0))
  ep = make_episode(0, [0, 1], 2)
  s, labels = ep['support_images'], ep['support_labels']
  mask, q = ep['support_mask'], ep['query_images']
  with pytest.raises(AssertionError, match='prefix'):
    model(s, labels[:1], mask, q, num_ways=2)
  with pytest.raises(AssertionError, match='type'):
    model(s, labels.astype(np.float32), mask, q, num_ways=2)
  with pytest.raises(AssertionError, match='rank'):
    model(s[0], labels, mask, q, num_ways=2)
