"""SimCLR episodes: conversion, episode fraction, augmentations, training."""

import dataclasses
import itertools

import numpy as np
import pytest
import tensorflow as tf

from meta_dataset_pipeline import padding
from meta_dataset_pipeline import pipeline
from meta_dataset_pipeline import simclr
import meta_dataset_pipeline as mdp

SIZE = 28
# No randomness at all: SimCLR query rows must equal their support rows.
IDENTITY = mdp.SimCLRAugmentation(
    crop=False, flip=False, color_jitter_probability=0.0,
    grayscale_probability=0.0, query_blur=False)


@pytest.fixture(scope="module")
def omniglot(shared_dir):
  return mdp.load_dataset_spec(shared_dir / "fixtures" / "md_records" /
                               "omniglot")


def _reference_rows(support_ids, query_ids):
  """Upstream's rule, literally: first k support rows of a class with k
  queries, in support order."""
  keep = []
  seen = {}
  want = {c: list(query_ids).count(c) for c in set(query_ids)}
  for i, c in enumerate(support_ids):
    seen[c] = seen.get(c, 0) + 1
    if seen[c] <= want.get(c, 0):
      keep.append(i)
  return keep


def test_query_rows_for_uneven_shots():
  # Class 5: 3 shots, 2 queries; class 7: 1 shot, 3 queries (only one
  # copy is possible); class 9: 2 shots, 1 query.
  support = np.array([5, 5, 5, 7, 9, 9])
  query = np.array([5, 5, 7, 7, 7, 9])
  np.testing.assert_array_equal(simclr.simclr_query_rows(support, query),
                                [0, 1, 3, 4])
  # Interleaved classes: the pairing is by class id, not position.
  np.testing.assert_array_equal(
      simclr.simclr_query_rows(np.array([7, 5, 7, 5]), np.array([5, 7, 7])),
      [0, 1, 2])
  rng = np.random.default_rng(0)
  for _ in range(200):
    support = rng.integers(0, 6, rng.integers(1, 30))
    query = rng.integers(0, 8, rng.integers(1, 30))
    np.testing.assert_array_equal(simclr.simclr_query_rows(support, query),
                                  _reference_rows(support, query))


def test_convert_episode_labels_and_class_ids():
  images = [b"s0", b"s1", b"s2", b"s3", b"q0", b"q1", b"q2", b"q3", b"q4"]
  class_ids = [10, 10, 10, 11, 10, 10, 11, 11, 11]
  new_images, labels, ids, ways = simclr.convert_episode(images, class_ids, 4)
  assert ways == 4
  assert new_images == [b"s0", b"s1", b"s2", b"s3", b"s0", b"s1", b"s3"]
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 0, 1, 3])
  np.testing.assert_array_equal(ids, [10, 10, 10, 11, 10, 10, 11])
  assert labels.dtype == np.int32 and ids.dtype == np.int32


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_converted_fraction_matches_config(fraction):
  n = 4000
  hits = sum(simclr.is_simclr_episode([3, 0], i, fraction) for i in range(n))
  # Binomial: within 4.5 standard deviations (exact at 0 and 1).
  assert abs(hits - n * fraction) <= 4.5 * np.sqrt(n * fraction *
                                                   (1 - fraction))
  again = [simclr.is_simclr_episode([3, 0], i, fraction) for i in range(50)]
  other = [simclr.is_simclr_episode([4, 0], i, fraction) for i in range(50)]
  assert again == [simclr.is_simclr_episode([3, 0], i, fraction)
                   for i in range(50)]
  if 0 < fraction < 1:
    assert again != other  # The seed decides which episodes convert.


def _generated(spec, fraction, n, seed=5):
  """The first `n` packed episodes of the pipeline's generator."""
  cfg = mdp.EpisodeDescriptionConfig(simclr_episode_fraction=fraction)
  seed = [seed, 0]
  sources = pipeline._make_sources([spec], mdp.Split.TRAIN, cfg, seed, None,
                                   None)
  buckets = padding.buckets_for_samplers([s.sampler for s in sources])
  episodes = pipeline._episode_generator(sources, seed, buckets, 1000,
                                         fraction)()
  out = list(itertools.islice(episodes, n))
  episodes.close()  # Closes the class files now, not in a later GC pass.
  return out


def test_generator_converts_the_configured_fraction(omniglot):
  n = 120
  mixed = _generated(omniglot, 0.5, n)
  plain = _generated(omniglot, 0.0, n)
  flags = np.array([ep["simclr"] for ep in mixed])
  assert abs(flags.sum() - n / 2) <= 4.5 * np.sqrt(n / 4)
  for ep, orig in zip(mixed, plain):
    num_support, _, _, ways, _ = ep["info"]
    assert num_support == orig["info"][0]
    if not ep["simclr"]:  # Unconverted episodes are untouched...
      for key in ("blob", "labels", "class_ids", "info", "aug_seeds"):
        np.testing.assert_array_equal(ep[key], orig[key])
      continue
    # ... converted ones: a class per support image, queries copy supports.
    assert ways == num_support
    labels = ep["labels"]
    np.testing.assert_array_equal(labels[:num_support],
                                  np.arange(num_support))
    rows = labels[num_support:]
    np.testing.assert_array_equal(
        rows, simclr.simclr_query_rows(orig["class_ids"][:num_support],
                                       orig["class_ids"][num_support:]))
    np.testing.assert_array_equal(ep["class_ids"][num_support:],
                                  orig["class_ids"][rows])
    lengths = orig["lengths"][:num_support]
    np.testing.assert_array_equal(ep["lengths"][num_support:], lengths[rows])
    np.testing.assert_array_equal(ep["aug_seeds"],
                                  orig["aug_seeds"][:len(labels)])


def _image(seed=0, size=SIZE):
  rng = np.random.default_rng(seed)
  smooth = rng.uniform(-1, 1, (size // 4, size // 4, 3))
  return tf.constant(np.kron(smooth, np.ones((4, 4, 1))), tf.float32)


@pytest.mark.parametrize("aug", [mdp.SIMCLR_AUGMENTATION,
                                 mdp.BOHB_AUGMENTATION,
                                 dataclasses.replace(mdp.SIMCLR_AUGMENTATION,
                                                     color_jitter_strength=0.5)
                                 ])
def test_augmentation_shapes_ranges_determinism(aug):
  image = _image()
  for blur in (False, True):
    views = [simclr.augment_image(image, tf.constant([s, 1], tf.int64), aug,
                                  blur=blur) for s in range(6)]
    for v in views:
      assert v.shape == image.shape and v.dtype == tf.float32
      assert float(tf.reduce_min(v)) >= -1 and float(tf.reduce_max(v)) <= 1
    same = simclr.augment_image(image, tf.constant([0, 1], tf.int64), aug,
                                blur=blur)
    np.testing.assert_array_equal(views[0].numpy(), same.numpy())
    # Two views of the same image differ, and differ from the image.
    diffs = [float(tf.reduce_mean(tf.abs(a - b)))
             for a, b in itertools.combinations(views, 2)]
    assert min(diffs) > 1e-3
    assert min(float(tf.reduce_mean(tf.abs(v - image))) for v in views) > 1e-3


def test_blur_smooths_and_keeps_the_mean():
  rng = np.random.default_rng(1)
  noise = tf.constant(rng.uniform(0.2, 0.8, (40, 40, 3)), tf.float32)
  blurred = simclr.gaussian_blur(noise, 2.0, 40 // 10)
  inner = (slice(4, -4), slice(4, -4))  # Away from the zero padding.
  assert float(tf.math.reduce_std(blurred[inner])) < 0.5 * float(
      tf.math.reduce_std(noise[inner]))
  np.testing.assert_allclose(float(tf.reduce_mean(blurred[inner])),
                             float(tf.reduce_mean(noise[inner])), atol=0.02)
  # Upstream's kernel for small images: height // 10 < 2 means no blur.
  np.testing.assert_array_equal(simclr.gaussian_blur(noise, 2.0, 1), noise)


def test_closed_form_saturation_matches_tf():
  rng = np.random.default_rng(3)
  x = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
  x[0, 0] = 0.5  # Grey pixel: no saturation to scale.
  for f in (0.0, 0.3, 1.0, 1.7):
    want = tf.image.adjust_saturation(x, f)
    np.testing.assert_allclose(simclr.adjust_saturation(x, f), want,
                               atol=1e-6)


def test_bad_augmentation_settings():
  with pytest.raises(ValueError, match="crop_area_range"):
    mdp.SimCLRAugmentation(crop_area_range=(0.5, 0.1))
  with pytest.raises(ValueError, match="unknown episode augmentation 'bohd'"):
    mdp.augmentation_by_name("bohd")


def _episodes(spec, n, aug, fraction=1.0, md=None, seed=2):
  cfg = mdp.EpisodeDescriptionConfig(simclr_episode_fraction=fraction)
  ds = mdp.make_one_source_episode_dataset(
      spec, "TRAIN", cfg, SIZE, seed=seed, simclr_augmentation=aug,
      md_augmentation=md)
  it = ds.as_numpy_iterator()
  out = list(itertools.islice(it, n))
  del it
  return out


def test_pipeline_simclr_episodes(omniglot):
  # Without augmentation, each query is exactly its support image.
  for ep in _episodes(omniglot, 2, IDENTITY):
    ns, nq = ep["support_mask"].sum(), ep["query_mask"].sum()
    assert ep["num_ways"] == ns
    np.testing.assert_array_equal(ep["support_labels"][:ns], np.arange(ns))
    rows = ep["query_labels"][:nq]
    assert len(set(rows)) == nq  # One copy per support image at most.
    np.testing.assert_array_equal(ep["query_images"][:nq],
                                  ep["support_images"][rows])
    np.testing.assert_array_equal(ep["query_class_ids"][:nq],
                                  ep["support_class_ids"][rows])
    assert (ep["query_images"][nq:] == 0).all()
  # With the SimCLR augmentation: same shapes, [-1, 1], views differ, and
  # the same seed gives the same episodes.
  eps = _episodes(omniglot, 2, mdp.SIMCLR_AUGMENTATION)
  for ep, plain in zip(eps, _episodes(omniglot, 2, IDENTITY)):
    assert ep["support_images"].shape == plain["support_images"].shape
    assert ep["support_images"].dtype == np.float32
    assert np.abs(ep["support_images"]).max() <= 1
    nq = ep["query_mask"].sum()
    rows = ep["query_labels"][:nq]
    assert not np.allclose(ep["query_images"][:nq],
                           ep["support_images"][rows])
  again = _episodes(omniglot, 2, mdp.SIMCLR_AUGMENTATION)
  for a, b in zip(eps, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_md_augmentation_only_on_ordinary_episodes(omniglot):
  plain = _episodes(omniglot, 1, None, fraction=0.0)[0]
  bohb = _episodes(omniglot, 1, None, fraction=0.0,
                   md=mdp.BOHB_AUGMENTATION)[0]
  for key in plain:
    if key.endswith("images"):
      assert plain[key].shape == bohb[key].shape
      assert not np.allclose(plain[key], bohb[key])
    else:
      np.testing.assert_array_equal(plain[key], bohb[key])


def test_max_ways_covers_simclr_support_sets():
  from ctx_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments import ctx_simclr  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  assert input_pipeline.max_ways(config, "TRAIN") == 50
  config = ctx_simclr.get_config()
  assert config.data.train_episode.simclr_episode_fraction == 0.5
  assert config.data.eval_episode.simclr_episode_fraction == 0.0
  assert input_pipeline.max_ways(config, "TRAIN") == 500  # Support size.
  assert input_pipeline.max_ways(config, "TEST") == 50
  config.data.train_episode.num_ways = 5
  config.data.train_episode.num_support = 7
  assert input_pipeline.max_ways(config, "TRAIN") == 35
  bohb = ctx_simclr.get_config("bohb")
  assert bohb.data.md_augmentation == "bohb"
  # config.data.bohb holds BOHB_AUGMENTATION's settings; overrides reach
  # the pipeline, and a mistyped setting is named.
  got = input_pipeline.episode_augmentations(bohb, "TRAIN")
  assert got["md_augmentation"] == mdp.BOHB_AUGMENTATION
  assert input_pipeline.episode_augmentations(bohb, "TEST")[
      "md_augmentation"] is None
  bohb.data.bohb.color_jitter_strength = 0.3
  bohb.data.bohb.crop_area_range = (0.5, 1.0)
  got = input_pipeline.episode_augmentations(bohb, "TRAIN")["md_augmentation"]
  assert got == dataclasses.replace(mdp.BOHB_AUGMENTATION,
                                    color_jitter_strength=0.3,
                                    crop_area_range=(0.5, 1.0))
  bohb.data.bohb.colour_jitter = 0.1
  with pytest.raises(ValueError, match=r"bohb.*\['colour_jitter'\]"):
    input_pipeline.episode_augmentations(bohb, "TRAIN")
  with pytest.raises(ValueError, match="given for episode augmentation "
                     "'none'"):
    mdp.augmentation_by_name("none", flip=False)
  config.data.md_augmentation = "bohd"
  with pytest.raises(ValueError, match="md_augmentation.*'bohd'"):
    input_pipeline.episode_augmentations(config, "TRAIN")
  config.data.md_augmentation = "none"
  config.data.augment_on = "gpu"
  with pytest.raises(ValueError, match="augment_on must be 'host' or"):
    input_pipeline.episode_augmentations(config, "TRAIN")


def test_demo_simclr_trains_with_converted_episodes(tmp_path, monkeypatch):
  from ctx_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import train  # pylint: disable=g-import-not-at-top
  from experiments import demo  # pylint: disable=g-import-not-at-top
  from tests import fakes  # pylint: disable=g-import-not-at-top
  data = fakes.make_tiny_demo(tmp_path / "data")
  config = demo.get_config("simclr,smoke")
  config.model.query_dim = config.model.val_dim = 16
  config.data.records_root = str(data.parent)
  config.num_devices = 1
  config.train.num_steps = 4
  config.train.valid_every = 0
  config.eval.num_episodes = 2
  assert input_pipeline.max_ways(config, "TRAIN") == 4  # 2 ways x 2 shots.
  seen = []
  original = input_pipeline.episodes

  def recording(config, split, *args, **kwargs):
    for episode in original(config, split, *args, **kwargs):
      if split == "TRAIN":
        seen.append(episode)
      yield episode

  monkeypatch.setattr(input_pipeline, "episodes", recording)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 4
  assert 0.0 <= results["test"]["glyphs"]["mean"] <= 1.0
  # SimCLR episodes (4 ways: one per support image) and ordinary 2-way
  # episodes both reached the train step.
  ways = [int(ep["num_ways"]) for ep in seen[:4]]
  assert 4 in ways and 2 in ways, ways
  for ep in seen:
    if ep["num_ways"] == 4:
      np.testing.assert_array_equal(ep["support_labels"], np.arange(4))


def test_episode_grid_png(shared_dir, tmp_path, capsys):
  from meta_dataset_pipeline import episode_grid  # pylint: disable=g-import-not-at-top
  records = shared_dir / "fixtures" / "md_records" / "dtd"
  png = tmp_path / "grid.png"
  assert episode_grid.main([str(records), "--output", str(png),
                            "--image_size", "16", "--num_ways", "3"]) == 0
  assert png.read_bytes()[:4] == b"\x89PNG"
  assert f"wrote {png}" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    episode_grid.main([str(tmp_path / "nope"), "--output", str(png)])
  assert e.value.code == 1
  assert "md-episode-grid: error" in capsys.readouterr().err


def test_jax_augmentation_batch():
  import jax  # pylint: disable=g-import-not-at-top

  from ctx_jax.data import augment  # pylint: disable=g-import-not-at-top
  images = np.stack([_image(s, 32).numpy() for s in range(6)])
  params = augment.AugmentParams()
  fn = jax.jit(lambda x, key, enabled: augment.augment_batch(
      x, jax.random.split(key, x.shape[0]), params, True, enabled))
  enabled = np.array([True] * 5 + [False])
  out = np.asarray(fn(images, jax.random.key(0), enabled))
  assert out.shape == images.shape and out.dtype == np.float32
  assert out.min() >= -1 and out.max() <= 1
  np.testing.assert_array_equal(out, fn(images, jax.random.key(0), enabled))
  np.testing.assert_array_equal(out[5], images[5])  # Disabled row.
  other = np.asarray(fn(images, jax.random.key(1), enabled))
  for a, b, x in zip(out[:5], other[:5], images):
    assert np.abs(a - b).mean() > 1e-3 and np.abs(a - x).mean() > 1e-3


def test_jax_ops_match_tf():
  from ctx_jax.data import augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = rng.uniform(0, 1, (40, 40, 3)).astype(np.float32)
  np.testing.assert_allclose(augment.rgb_to_hsv(x), tf.image.rgb_to_hsv(x),
                             atol=1e-5)
  np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(x)), x,
                             atol=1e-5)
  np.testing.assert_allclose(augment._blur(x, 1.3, 40 // 10),
                             simclr.gaussian_blur(tf.constant(x), 1.3, 4),
                             atol=1e-5)
  # Greyscale only: exactly TF's weights.
  only_gray = augment.AugmentParams(crop=False, flip=False,
                                    color_jitter_probability=0.0,
                                    grayscale_probability=1.0)
  import jax  # pylint: disable=g-import-not-at-top
  got = augment.augment_image(x * 2 - 1, jax.random.key(0), only_gray)
  want = tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]) * 2 - 1
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_on_device_augmentation(omniglot):
  import jax  # pylint: disable=g-import-not-at-top

  from ctx_jax.data import augment  # pylint: disable=g-import-not-at-top
  from ctx_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from experiments import demo  # pylint: disable=g-import-not-at-top
  cfg = mdp.EpisodeDescriptionConfig(num_ways=3, num_support=2, num_query=2,
                                     simclr_episode_fraction=0.5)
  kwargs = dict(simclr_augmentation=IDENTITY, md_augmentation=None)
  host = _take_cfg(omniglot, cfg, 6, **kwargs)
  device = _take_cfg(omniglot, cfg, 6, augment_on_device=True, **kwargs)
  modes = set()
  for h, d in zip(host, device):
    for prefix in ("support_", "query_"):
      np.testing.assert_array_equal(h[prefix + "images"],
                                    d[prefix + "images"])
      mode = d[prefix + "aug_mode"]
      assert d[prefix + "aug_seeds"].dtype == np.int32
      simclr_ep = h["num_ways"] == h["support_mask"].sum() == 6
      want = np.where(d[prefix + "mask"], 2 if simclr_ep else 0, 0)
      np.testing.assert_array_equal(mode, want)
      modes.add(int(mode.max()))
  assert modes == {0, 2}
  # On device (as the train loop does it with `augment_on="device"`): SimCLR
  # rows change, the others and padding do not.
  config = demo.get_config("simclr,smoke")
  assert input_pipeline.device_augmenter(config) == ((), None)
  config.data.augment_on = "device"
  keys, device_augment = input_pipeline.device_augmenter(config)
  assert keys == augment.DEVICE_KEYS
  ep = next(d for d in device if d["support_aug_mode"].max() == 2)
  out = device_augment({k: jax.numpy.asarray(v) for k, v in ep.items()})
  assert set(out) == set(ep) - set(augment.DEVICE_KEYS)
  for prefix in ("support_", "query_"):
    changed = np.abs(np.asarray(out[prefix + "images"]) -
                     ep[prefix + "images"]).mean(axis=(1, 2, 3)) > 1e-4
    np.testing.assert_array_equal(changed, ep[prefix + "aug_mode"] == 2)


def _take_cfg(spec, cfg, n, **kwargs):
  ds = mdp.make_one_source_episode_dataset(spec, "TRAIN", cfg, SIZE, seed=1,
                                           **kwargs)
  it = ds.as_numpy_iterator()
  out = list(itertools.islice(it, n))
  del it
  return out
