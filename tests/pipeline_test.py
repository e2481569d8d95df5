"""Episode and batch pipelines over official-format records."""

import ast
import gc
import itertools
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from meta_dataset_pipeline import decoder
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import reader
import meta_dataset_pipeline as mdp

SIZE = 28  # Small images keep the tests fast; the maths is size-agnostic.
CFG = mdp.EpisodeDescriptionConfig()


@pytest.fixture(scope="module")
def records(shared_dir):
  return shared_dir / "fixtures" / "md_records"


@pytest.fixture(scope="module")
def omniglot(records):
  return mdp.load_dataset_spec(records / "omniglot")


@pytest.fixture(scope="module")
def dtd(records):
  return mdp.load_dataset_spec(records / "dtd")


def _take(ds, num):
  return list(itertools.islice(ds.as_numpy_iterator(), num))


def _read_class(spec, class_id):
  """All serialized records of a class file, in file order."""
  return [r.numpy() for r in tf.data.TFRecordDataset(
      spec.class_file(class_id))]


def _check_episode(ep, spec, split, buckets):
  s, q = len(ep["support_mask"]), len(ep["query_mask"])
  assert (s, q) in {(a, b) for a in buckets.support for b in buckets.query}
  assert ep["support_images"].shape == (s, SIZE, SIZE, 3)
  assert ep["query_images"].shape == (q, SIZE, SIZE, 3)
  assert ep["support_images"].dtype == np.float32
  for part in ("support", "query"):
    mask = ep[f"{part}_mask"]
    n = mask.sum()
    assert mask[:n].all() and not mask[n:].any()  # Real rows first.
    images, labels = ep[f"{part}_images"], ep[f"{part}_labels"]
    ids = ep[f"{part}_class_ids"]
    assert labels.dtype == np.int32 and ids.dtype == np.int32
    assert (images[n:] == 0).all() and (labels[n:] == 0).all()
    assert (ids[n:] == -1).all()
    assert images[:n].min() >= -1 and images[:n].max() <= 1
    assert set(ids[:n]) <= set(spec.get_classes(split))
    # Labels index the ways in sampling order; ids and labels agree.
    assert labels[:n].max() == ep["num_ways"] - 1
    for way in range(ep["num_ways"]):
      assert len(set(ids[:n][labels[:n] == way])) == 1
  # Support and query use the same classes, with the same labels.
  pairs = lambda p: set(zip(ep[f"{p}_labels"][ep[f"{p}_mask"]],
                            ep[f"{p}_class_ids"][ep[f"{p}_mask"]]))
  assert pairs("support") == pairs("query")


def test_one_source_episodes(omniglot):
  buckets = mdp.episode_buckets(omniglot, "TRAIN", CFG)
  ds = mdp.make_one_source_episode_dataset(omniglot, mdp.Split.TRAIN, CFG,
                                           image_size=SIZE, seed=0)
  assert set(ds.element_spec) == set(mdp.EPISODE_KEYS)
  episodes = _take(ds, 6)
  for ep in episodes:
    _check_episode(ep, omniglot, "TRAIN", buckets)
    assert ep["source_id"] == 0
    # Bi-level sampling: all classes from one alphabet.
    ids = ep["support_class_ids"][ep["support_mask"]]
    offsets = omniglot.superclass_offsets
    assert len(set(np.searchsorted(offsets, ids, side="right"))) == 1


def test_images_decode_like_upstream(omniglot):
  """Our decode equals upstream's ops applied to the same record."""
  fixed = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=1,
                                       num_query=1)
  ep = _take(mdp.make_one_source_episode_dataset(
      omniglot, "TEST", fixed, image_size=SIZE, seed=3), 1)[0]
  class_id = ep["support_class_ids"][0]
  want = []
  for record in _read_class(omniglot, class_id):
    parsed = tf.io.parse_single_example(record, {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64)})
    image = tf.image.decode_image(parsed["image"], channels=3)
    image = tf.compat.v1.image.resize_images(image, [SIZE, SIZE],
                                             align_corners=True)
    want.append(2 * (image.numpy() / 255.0 - 0.5))
  # The support image is one of the class's records, decoded identically.
  errors = [np.abs(w - ep["support_images"][0]).max() for w in want]
  assert min(errors) < 1e-6


def test_bilinear_align_corners_semantics():
  """Corner pixels are kept exactly and the midpoint interpolates."""
  image = tf.constant([[[0, 0, 0], [255, 255, 255]]] * 2, tf.uint8)
  png = tf.io.encode_png(image)
  out = decoder.decode_and_resize(png, 3).numpy()
  np.testing.assert_allclose(out[0, :, 0], [-1.0, 0.0, 1.0], atol=1e-6)


def test_decoder_ops_eager_and_in_map():
  image = tf.cast(tf.random.stateless_uniform([20, 30, 3], [1, 2],
                                              maxval=255), tf.uint8)
  jpeg = tf.io.encode_jpeg(image)
  aug = mdp.DataAugmentation(enable_jitter=True, jitter_amount=4,
                             enable_gaussian_noise=True,
                             gaussian_noise_std=0.1)
  seed = tf.constant([3, 4], tf.int64)

  def fn(data):
    return decoder.augment(decoder.decode_and_resize(data, 16), aug, seed)

  eager = fn(jpeg).numpy()
  mapped = next(iter(tf.data.Dataset.from_tensors(jpeg).map(fn))).numpy()
  np.testing.assert_allclose(eager, mapped, atol=1e-6)
  plain = decoder.decode_and_resize(jpeg, 16).numpy()
  assert eager.shape == plain.shape and not np.allclose(eager, plain)


def test_record_parsing_and_image_checks(dtd):
  record = _read_class(dtd, 2)[0]
  image, label = decoder.parse_record(record)
  assert label == 2 and decoder.image_bytes_problem(image) is None
  assert "truncated JPEG" in decoder.image_bytes_problem(image[:-50])
  assert "not a JPEG" in decoder.image_bytes_problem(b"GIF")
  png = tf.io.encode_png(tf.zeros([2, 2, 3], tf.uint8)).numpy()
  assert decoder.image_bytes_problem(png) is None
  with pytest.raises(ValueError, match="tf.train.Example"):
    decoder.parse_record(b"\x01\x02garbage")


def test_multisource_picks_sources_uniformly(omniglot, dtd):
  ds = mdp.make_multisource_episode_dataset([omniglot, dtd], "TRAIN", CFG,
                                            image_size=SIZE, seed=1)
  buckets = mdp.episode_buckets([omniglot, dtd], "TRAIN", CFG)
  episodes = _take(ds, 16)
  sources = np.array([ep["source_id"] for ep in episodes])
  assert 3 <= sources.sum() <= 13  # Binomial(16, 1/2), p(miss) < 0.5%.
  for ep in episodes:
    spec = [omniglot, dtd][ep["source_id"]]
    _check_episode(ep, spec, "TRAIN", buckets)


def test_deterministic_given_seed(dtd):
  make = lambda seed: mdp.make_one_source_episode_dataset(
      dtd, "TEST", CFG, image_size=SIZE, seed=seed)
  a, b, c = _take(make(5), 3), _take(make(5), 3), _take(make(6), 3)
  for x, y in zip(a, b):
    for key in mdp.EPISODE_KEYS:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(x["support_images"].shape != z["support_images"].shape
             or not np.array_equal(x["support_images"], z["support_images"])
             for x, z in zip(a, c))


def test_pad_multiple_and_bounded_shapes(omniglot):
  buckets = mdp.episode_buckets(omniglot, "TEST", CFG, pad_multiple=8)
  assert all(b % 8 == 0 for b in buckets.support + buckets.query)
  ds = mdp.make_one_source_episode_dataset(omniglot, "TEST", CFG,
                                           image_size=8, seed=2,
                                           pad_multiple=8)
  shapes = set()
  for ep in _take(ds, 12):
    shapes.add((len(ep["support_mask"]), len(ep["query_mask"])))
  assert all(s % 8 == 0 and q % 8 == 0 for s, q in shapes)
  assert len(shapes) <= buckets.num_programs


def test_fixed_shape_config_has_one_shape(dtd):
  fixed = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=5,
                                       num_query=10)
  buckets = mdp.episode_buckets(dtd, "TRAIN", fixed, pad_multiple=4)
  assert buckets == padding.EpisodeBuckets((28,), (52,))
  ds = mdp.make_one_source_episode_dataset(dtd, "TRAIN", fixed, SIZE,
                                           seed=0, pad_multiple=4)
  for ep in _take(ds, 3):
    assert ep["support_mask"].sum() == 25 and ep["query_mask"].sum() == 50
    assert len(ep["support_mask"]) == 28 and len(ep["query_mask"]) == 52
    assert ep["num_ways"] == 5
    assert np.bincount(ep["support_labels"][:25]).tolist() == [5] * 5


def test_geometric_buckets():
  assert padding.geometric_buckets(500, 8, 2.0) == (8, 16, 32, 64, 128, 256,
                                                    500)
  # A bucket within half a step of the top is dropped.
  assert padding.geometric_buckets(500, 8, 1.5)[-2:] == (315, 500)
  assert padding.geometric_buckets(500, 8, 1.5, multiple=8)[-1] == 504
  assert padding.geometric_buckets(3, 8, 1.5) == (3,)
  buckets = padding.EpisodeBuckets((8, 16), (10,))
  assert buckets.pick(9, 10) == (16, 10)
  with pytest.raises(ValueError, match="exceeds"):
    buckets.pick(17, 1)


def test_augmentation_only_where_asked(dtd):
  fixed = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=2,
                                       num_query=2)
  plain = _take(mdp.make_one_source_episode_dataset(
      dtd, "VALID", fixed, SIZE, seed=4), 1)[0]
  noisy = _take(mdp.make_one_source_episode_dataset(
      dtd, "VALID", fixed, SIZE, seed=4,
      support_augmentation=mdp.DataAugmentation(
          enable_gaussian_noise=True, gaussian_noise_std=0.5)), 1)[0]
  np.testing.assert_array_equal(plain["query_images"], noisy["query_images"])
  assert np.abs(plain["support_images"] - noisy["support_images"]).mean() > (
      0.2)


def test_class_stream_flush_and_shuffle(dtd):
  """Upstream's pass semantics: no repeats within a pass or an episode."""
  num = dtd.get_total_images_per_class(3)
  stream = reader.ClassStream(dtd.class_file(3), num, 3,
                              np.random.default_rng(0), 1000)
  first, flushed = stream.take(num - 4)
  assert flushed == 0 and len(set(first.tolist())) == num - 4
  second, flushed = stream.take(10)  # Needs a new pass: 4 are dropped.
  assert flushed == 4 and len(set(second.tolist())) == 10
  # Passes are reshuffled.
  assert not np.array_equal(first[:10], second)
  assert stream.read(int(second[0])) in _read_class(dtd, 3)


def test_open_files_are_bounded(dtd):
  open_files = reader.OpenFiles(limit=2)
  streams = [reader.ClassStream(dtd.class_file(c),
                                dtd.get_total_images_per_class(c), c,
                                np.random.default_rng(c), 1000, open_files)
             for c in range(4)]
  for _ in range(2):
    for stream in streams:
      picked, _ = stream.take(3)
      assert all(decoder.parse_record(stream.read(int(i)))[1] ==
                 stream.class_id for i in picked)
  assert sum(s._reader is not None for s in streams) == 2  # pylint: disable=protected-access


def test_dropped_streams_close_their_files_without_gc(dtd):
  """No reference cycle keeps a stream (and its open file) alive."""
  open_files = reader.OpenFiles(limit=2)
  stream = reader.ClassStream(dtd.class_file(0),
                              dtd.get_total_images_per_class(0), 0,
                              np.random.default_rng(0), 1000, open_files)
  stream.read(int(stream.take(1)[0][0]))
  file = stream._reader  # pylint: disable=protected-access
  gc.disable()
  try:
    del stream
    assert file.closed
  finally:
    gc.enable()


def test_buffer_shuffle_order():
  rng = np.random.default_rng(0)
  # A buffer holding everything: uniform permutations.
  firsts = [reader.buffer_shuffle_order(5, 10, rng)[0] for _ in range(2000)]
  assert np.bincount(firsts).min() > 330
  # A buffer of 2 over 100 items: item i can come out no earlier than i-1.
  order = reader.buffer_shuffle_order(100, 2, rng)
  assert sorted(order) == list(range(100))
  assert all(pos >= item - 1 for pos, item in enumerate(order))
  assert reader.buffer_shuffle_order(4, 0, rng).tolist() == [0, 1, 2, 3]


# --- Bad input.


def _copy(records, name, tmp_path):
  target = tmp_path / name
  shutil.copytree(records / name, target)
  for path in target.iterdir():
    path.chmod(0o644)
  return target


def _write_records(path, examples):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for image_bytes, label in examples:
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          "image": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[image_bytes])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(
              value=[label])),
      })).SerializeToString())


def _first_episode(spec, split="TEST"):
  return _take(mdp.make_one_source_episode_dataset(
      spec, split, mdp.EpisodeDescriptionConfig(
          num_ways=7, num_support=2, num_query=2), SIZE, seed=0), 1)


def test_missing_dataset_dir_and_class_file(records, tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset_spec.json"):
    mdp.load_dataset_spec(tmp_path / "absent")
  target = _copy(records, "dtd", tmp_path)
  (target / "44.tfrecords").unlink()
  spec = mdp.load_dataset_spec(target)
  with pytest.raises(FileNotFoundError, match=r"44\.tfrecords"):
    mdp.make_one_source_episode_dataset(spec, "TEST", CFG, SIZE)
  shutil.rmtree(target)
  with pytest.raises(FileNotFoundError, match="records folder"):
    mdp.make_one_source_episode_dataset(spec, "TEST", CFG, SIZE)


def test_spec_lists_more_images_than_records(records, tmp_path):
  target = _copy(records, "dtd", tmp_path)
  spec_path = target / "dataset_spec.json"
  dct = json.loads(spec_path.read_text())
  dct["images_per_class"]["42"] += 3
  spec_path.write_text(json.dumps(dct))
  spec = mdp.load_dataset_spec(target)
  want = (r"42\.tfrecords: the spec lists \d+ images for class 42 but the "
          r"file holds \d+ records")
  # The build checks only what is cheap (sizes, file ends); the count is
  # checked when class 42 is first sampled: here by the first episode (all 7
  # test classes).
  every_class = mdp.EpisodeDescriptionConfig(num_ways=7, num_support=1,
                                             num_query=1)
  for build in (
      lambda: mdp.make_one_source_episode_dataset(spec, "TEST", every_class,
                                                  SIZE),
      lambda: mdp.make_multisource_episode_dataset([spec], "TEST",
                                                   every_class, SIZE)):
    dataset = build()
    with pytest.raises(tf.errors.OpError, match=want):
      _take(dataset, 1)
  # Fewer images listed than the file holds: also an error.
  dct["images_per_class"]["42"] -= 4
  spec_path.write_text(json.dumps(dct))
  with pytest.raises(tf.errors.OpError, match=want):
    _first_episode(mdp.load_dataset_spec(target))


def test_truncated_and_corrupt_records(records, tmp_path):
  target = _copy(records, "dtd", tmp_path)
  path = target / "41.tfrecords"
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  spec = mdp.load_dataset_spec(target)
  with pytest.raises(mdp.RecordError, match=r"41\.tfrecords.*truncated"):
    _first_episode(spec)  # At build: the file's end is checked then.
  # Flip a payload byte of every record: framing stays intact, CRCs fail.
  corrupt = bytearray(data)
  path.write_bytes(data)
  for offset in reader.index_records(str(path)):
    corrupt[offset + 20] ^= 0xFF
  path.write_bytes(bytes(corrupt))
  with pytest.raises(tf.errors.OpError,
                     match=r"41\.tfrecords: record \d+ .*is corrupt"):
    _first_episode(spec)


def test_image_that_fails_to_decode(records, tmp_path):
  target = _copy(records, "dtd", tmp_path)
  path = target / "43.tfrecords"
  good = [tf.train.Example.FromString(r) for r in _read_class(
      mdp.load_dataset_spec(records / "dtd"), 43)]
  examples = [(e.features.feature["image"].bytes_list.value[0], 43)
              for e in good]
  examples = [(b"definitely not an image", 43)] + [
      (img[:len(img) // 2], 43) for img, _ in examples[1:]]
  _write_records(path, examples)
  spec = mdp.load_dataset_spec(target)
  with pytest.raises(tf.errors.OpError,
                     match=r"43\.tfrecords: record \d+ of class 43: "
                     r"(not a JPEG|truncated JPEG)"):
    _first_episode(spec)


def _scramble_jpeg_body(image, rng):
  """Random entropy-coded data between intact headers and end marker."""
  body = image.index(b"\xff\xda") + 20  # Past the start-of-scan header.
  noise = rng.integers(0, 256, len(image) - body - 2, dtype=np.uint8)
  return image[:body] + noise.tobytes() + image[-2:]


def test_corrupt_jpeg_body_error_names_the_record(records, tmp_path):
  # Headers and end marker intact, so the reader's byte checks pass; TF's
  # decoder then fails ("Invalid JPEG data"), and the error must still say
  # which file, record and class.
  target = _copy(records, "dtd", tmp_path)
  spec = mdp.load_dataset_spec(records / "dtd")
  rng = np.random.default_rng(0)
  examples = []
  for r in _read_class(spec, 43):
    image = tf.train.Example.FromString(r).features.feature[
        "image"].bytes_list.value[0]
    bad = _scramble_jpeg_body(image, rng)
    assert decoder.image_bytes_problem(bad) is None
    examples.append((bad, 43))
  with pytest.raises(tf.errors.InvalidArgumentError):
    tf.io.decode_image(examples[0][0], channels=3)
  _write_records(target / "43.tfrecords", examples)
  broken = mdp.load_dataset_spec(target)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"43\.tfrecords: record \d+ of class 43: the "
                     r"image failed to decode"):
    _first_episode(broken)


def test_record_with_wrong_label(records, tmp_path):
  target = _copy(records, "dtd", tmp_path)
  spec = mdp.load_dataset_spec(records / "dtd")
  examples = [(tf.train.Example.FromString(r).features.feature["image"]
               .bytes_list.value[0], 7) for r in _read_class(spec, 45)]
  _write_records(target / "45.tfrecords", examples)
  with pytest.raises(tf.errors.OpError,
                     match=r"45\.tfrecords: record \d+ of class 45 has "
                     r"label 7"):
    _first_episode(mdp.load_dataset_spec(target))


def test_impossible_config_is_reported_at_build(dtd):
  too_many = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=15,
                                          num_query=10)
  with pytest.raises(ValueError, match=r"num_support \+ num_query = 25"):
    mdp.make_one_source_episode_dataset(dtd, "TRAIN", too_many, SIZE)
  with pytest.raises(ValueError, match="min_ways=8 .* 7"):
    mdp.make_one_source_episode_dataset(
        dtd, "TEST", mdp.EpisodeDescriptionConfig(min_ways=8), SIZE)



def test_never_imports_jax():
  """No pipeline module imports JAX (STYLE.md section 5).

  Checked on the sources: `import tensorflow` itself pulls in `jax` when it
  is installed (through `tensorflow.lite`), so `sys.modules` cannot tell.
  """
  package = pathlib.Path(mdp.__file__).parent
  for path in package.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom)
               else [])
      assert not any(n.split(".")[0] in ("jax", "flax", "optax")
                     for n in names), path


def test_decode_rows_equals_per_image_decode(dtd):
  # The one-loop fast path and the row-by-row path (which names a failed
  # row) give the very pixels of `decode_and_resize` per image, augmented
  # with each row's seed, then zero rows up to the padded size.
  images = [tf.train.Example.FromString(r).features.feature[
      "image"].bytes_list.value[0] for r in _read_class(dtd, 3)[:6]]
  seeds = tf.constant(np.arange(12).reshape(6, 2), tf.int64)
  aug = decoder.DataAugmentation(enable_jitter=True, jitter_amount=2,
                                 enable_gaussian_noise=True,
                                 gaussian_noise_std=0.1)
  for augmentation in (None, aug):
    want = np.stack([
        decoder.augment(decoder.decode_and_resize(x, SIZE), augmentation,
                        seeds[i]).numpy() for i, x in enumerate(images)])
    for rowwise in (False, True):
      got = decoder.decode_rows(
          tf.constant(images), tf.constant(9), SIZE, augmentation, seeds,
          lambda i: tf.constant("unused"), _rowwise=rowwise).numpy()
      assert got.shape == (9, SIZE, SIZE, 3)
      np.testing.assert_array_equal(got[:6], want)
      assert (got[6:] == 0).all()


def test_decoded_image_cache_serves_stored_images(dtd):
  image_a, image_b = [tf.train.Example.FromString(r).features.feature[
      "image"].bytes_list.value[0] for r in _read_class(dtd, 0)[:2]]
  cache = decoder.DecodedImageCache(2, SIZE)
  np.testing.assert_array_equal(
      cache.slots([(0, 0, 5), (0, 0, 6), (0, 1, 5), (0, 0, 5)]),
      [0, 1, -1, 0])  # First come first served; -1 once full.
  want_a = decoder.decode_and_resize(image_a, SIZE).numpy()
  want_b = decoder.decode_and_resize(image_b, SIZE).numpy()
  assert not np.array_equal(want_a, want_b)
  np.testing.assert_array_equal(cache.decode(image_a, tf.constant(0)), want_a)
  # Slot 0 is filled now: it is served from the cache, whatever the bytes.
  np.testing.assert_array_equal(cache.decode(image_b, tf.constant(0)), want_a)
  np.testing.assert_array_equal(cache.decode(image_b, tf.constant(-1)),
                                want_b)


def test_decoded_cache_gives_the_same_episodes(dtd, monkeypatch):
  # 15 episodes of 5 ways x 4 images from the 7 test classes (211 images)
  # revisit images, so cached images are served (and their records not
  # read again); a budget of 10 images mixes cached and uncached ones.
  # Augmentation runs after the cache.
  skipped = []
  read_image = reader.ClassStream.read_image

  def counting_read_image(stream, index):
    image = read_image(stream, index)
    skipped.append(image == b"")
    return image

  monkeypatch.setattr(reader.ClassStream, "read_image", counting_read_image)
  cfg = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=2, num_query=2)
  aug = decoder.DataAugmentation(enable_jitter=True, jitter_amount=2,
                                 enable_gaussian_noise=True,
                                 gaussian_noise_std=0.1)
  per_image = decoder.DecodedImageCache.bytes_per_image(SIZE)
  runs = [_take(mdp.make_one_source_episode_dataset(
      dtd, "TEST", cfg, SIZE, seed=4, support_augmentation=aug,
      decoded_cache_bytes=budget), 15) for budget in (0, 10**9,
                                                       10 * per_image)]
  assert any(skipped)  # Served from the cache without reading the record.
  for cached in runs[1:]:
    for a, b in zip(runs[0], cached):
      for key in mdp.EPISODE_KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
