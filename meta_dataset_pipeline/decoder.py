"""Decoding of official Meta-Dataset records into model-ready images.

Mirrors the official `ImageDecoder` (`meta_dataset/data/decoder.py`):

- a record is a `tf.train.Example` with `image` (encoded bytes) and `label`
  (absolute class id);
- the image is decoded with `decode_image(..., channels=3)` (JPEG, PNG, GIF,
  BMP), resized bilinearly to `image_size x image_size` with
  `align_corners=True` (upstream calls `tf.compat.v1.image.resize_images`),
  and scaled to [-1, 1] as `2 * (x / 255 - 0.5)`;
- optional augmentations, in upstream order: additive Gaussian noise, then
  "jitter" (reflect-pad by `jitter_amount` on each side and randomly crop
  back). Upstream's data config enables both with zero strength, i.e. off;
  here `None` means off.

Unlike upstream, randomness is stateless: each example carries its own seed,
so a pipeline with a fixed seed yields identical episodes on every run.

Every op here works both eagerly and inside `tf.data.Dataset.map`.
"""

import dataclasses
import threading

from google.protobuf import message
import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2

# Leading bytes of the encodings `tf.io.decode_image` accepts.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
# A complete JPEG ends with an end-of-image marker, possibly followed by a
# little padding; look for it near the end to catch truncated files.
_JPEG_TAIL_BYTES = 64


@dataclasses.dataclass(frozen=True)
class DataAugmentation:
  """Support/query augmentation, official `DataAugmentation` fields."""
  enable_jitter: bool = False
  jitter_amount: int = 0
  enable_gaussian_noise: bool = False
  gaussian_noise_std: float = 0.0

  @property
  def active(self) -> bool:
    return ((self.enable_jitter and self.jitter_amount > 0)
            or (self.enable_gaussian_noise and self.gaussian_noise_std > 0))


def parse_record(record: bytes) -> tuple[bytes, int]:
  """(encoded image, absolute label) of one serialized record.

  Parsed in Python (about 6 us with the upb protobuf runtime), which lets
  the reader check each record and name its file in errors before any TF
  op runs.

  Args:
    record: a serialized `tf.train.Example` with `image` and `label`.

  Returns:
    The image bytes and the label.

  Raises:
    ValueError: the record is not such an Example.
  """
  try:
    features = example_pb2.Example.FromString(record).features.feature
    image = features["image"].bytes_list.value
    label = features["label"].int64_list.value
  except message.DecodeError as e:
    raise ValueError(f"not a tf.train.Example ({e})") from None
  if len(image) != 1 or len(label) != 1:
    raise ValueError("expected one 'image' bytes and one 'label' int64 "
                     f"feature, found {sorted(features)}")
  return image[0], int(label[0])


def image_bytes_problem(image: bytes) -> str | None:
  """Why `image` cannot be a complete image, or None if it looks fine.

  `tf.io.decode_image` errors do not say which record failed, so this cheap
  check (magic bytes; a JPEG end-of-image marker near the end, which a
  truncated JPEG lacks) runs first, where the record is still known.

  Args:
    image: encoded image bytes.

  Returns:
    None, or a short description of the problem.
  """
  if not image.startswith(_MAGIC):
    return (f"not a JPEG/PNG/GIF/BMP image ({len(image)} bytes starting "
            f"{image[:4]!r})")
  if image.startswith(_MAGIC[0]) and b"\xff\xd9" not in image[
      -_JPEG_TAIL_BYTES:]:
    return f"truncated JPEG (no end-of-image marker; {len(image)} bytes)"
  return None


def decode_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes (3 channels) and resizes bilinearly with align_corners.

  Args:
    image_bytes: scalar string tensor, an encoded image.
    image_size: output height and width.

  Returns:
    float32 [image_size, image_size, 3] in [0, 255].
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  image = tf.compat.v1.image.resize_images(
      image, [image_size, image_size],
      method=tf.compat.v1.image.ResizeMethod.BILINEAR, align_corners=True)
  return tf.cast(image, tf.float32)


def scale(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] to [-1, 1], upstream's exact formula; any shape."""
  return 2.0 * (image / 255.0 - 0.5)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Official decode: 3 channels, bilinear align_corners, scaled to [-1, 1].

  Args:
    image_bytes: scalar string tensor, an encoded image.
    image_size: output height and width.

  Returns:
    float32 [image_size, image_size, 3] in [-1, 1].
  """
  return scale(decode_resize(image_bytes, image_size))


def augment(image: tf.Tensor, augmentation: DataAugmentation | None,
            seed: tf.Tensor) -> tf.Tensor:
  """Applies noise then jitter (official order), statelessly seeded.

  Args:
    image: float32 [H, W, 3].
    augmentation: the settings; None or inactive settings return `image`.
    seed: int32/int64 tensor of shape [2].

  Returns:
    The augmented image, same shape.
  """
  if augmentation is None or not augmentation.active:
    return image
  seeds = tf.random.experimental.stateless_split(seed, 2)
  if augmentation.enable_gaussian_noise and augmentation.gaussian_noise_std:
    image = image + augmentation.gaussian_noise_std * (
        tf.random.stateless_normal(tf.shape(image), seeds[0]))
  if augmentation.enable_jitter and augmentation.jitter_amount > 0:
    j = augmentation.jitter_amount
    padded = tf.pad(image, [[j, j], [j, j], [0, 0]], mode="REFLECT")
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seeds[1])
  return image


class DecodedImageCache:
  """Bounded cache of decoded, resized, scaled images (before augmentation).

  Exact: a hit returns the very float32 values `decode_and_resize` gave when
  the image was first decoded. Slots are handed out in Python, by whoever
  reads the records (one slot per (source, class, record) key, first come
  first served, until `capacity`); the pixels live in a TF variable that the
  decode map reads with a gather and fills with a scatter, so decoding keeps
  running in tf.data's threads. Two episodes decoding the same new image at
  once both decode it and write the same values; a slot is marked filled
  only after its pixels are written. Filled slots never empty, so the
  record reader may skip reading images that `is_filled` (as of its last
  `refresh_filled`) and send empty bytes for them.

  Images that get no slot (the cache is full) are decoded every time.
  """

  def __init__(self, capacity: int, image_size: int):
    if capacity <= 0:
      raise ValueError(f"capacity={capacity} must be positive")
    self.capacity = int(capacity)
    self.image_size = int(image_size)
    shape = [self.capacity, self.image_size, self.image_size, 3]
    self.images = tf.Variable(tf.zeros(shape, tf.float32), trainable=False,
                              name="decoded_images")
    self.filled = tf.Variable(tf.zeros([self.capacity], tf.int32),
                              trainable=False, name="decoded_filled")
    self._slots = {}
    self._lock = threading.Lock()  # Two iterators may share the cache.
    self._known_filled = np.zeros(self.capacity, bool)

  @staticmethod
  def bytes_per_image(image_size: int) -> int:
    return image_size * image_size * 3 * 4

  def slots(self, keys) -> np.ndarray:
    """int32 slot of each hashable key; -1 where the cache is full."""
    out = np.empty(len(keys), np.int32)
    table = self._slots
    with self._lock:
      for i, key in enumerate(keys):
        slot = table.get(key)
        if slot is None:
          slot = len(table) if len(table) < self.capacity else -1
          if slot >= 0:
            table[key] = slot
        out[i] = slot
    return out

  def refresh_filled(self):
    """Updates which slots are known to be filled (they never empty)."""
    if not self._known_filled[:len(self._slots)].all():
      self._known_filled = self.filled.numpy() > 0

  def is_filled(self, key) -> bool:
    """Whether `key`'s image was cached as of the last `refresh_filled`."""
    slot = self._slots.get(key)
    return slot is not None and bool(self._known_filled[slot])

  def all_filled(self, slots: tf.Tensor) -> tf.Tensor:
    """Whether every one of `slots` (int32 [N]) holds its image."""
    return tf.reduce_all(tf.logical_and(
        slots >= 0, tf.gather(self.filled, tf.maximum(slots, 0)) > 0))

  def decode(self, image_bytes: tf.Tensor, slot: tf.Tensor) -> tf.Tensor:
    """`decode_and_resize(image_bytes)`, from the cache when filled.

    Args:
      image_bytes: scalar string tensor, the encoded image.
      slot: int32 scalar from `slots`; -1 means not cached.

    Returns:
      float32 [image_size, image_size, 3] in [-1, 1].
    """
    index = tf.maximum(slot, 0)
    hit = tf.logical_and(slot >= 0, tf.gather(self.filled, index) > 0)

    def load():
      return tf.gather(self.images, index)

    def decode():
      image = decode_and_resize(image_bytes, self.image_size)

      def store():
        write = self.images.scatter_update(
            tf.IndexedSlices(image[None], index[None]))
        with tf.control_dependencies([write]):
          mark = self.filled.scatter_update(
              tf.IndexedSlices(tf.ones([1], tf.int32), index[None]))
        with tf.control_dependencies([mark]):
          return tf.identity(image)

      return tf.cond(slot >= 0, store, lambda: image)

    return tf.cond(hit, load, decode)


def _augment_fn(augmentation, extra):
  """image, seed -> image: `augment`, then `extra`; None if neither acts."""
  if (augmentation is None or not augmentation.active) and extra is None:
    return None

  def fn(image, seed):
    image = augment(image, augmentation, seed)
    return image if extra is None else extra(image, seed)
  return fn


def _from_cache(cache, slots, size, augmentation, seeds, extra=None):
  """decode_rows when every image is cached: gather, augment, zero-pad."""
  images = tf.gather(cache.images, slots)
  fn = _augment_fn(augmentation, extra)
  if fn is not None:
    images = tf.map_fn(lambda x: fn(x[0], x[1]), (images, seeds),
                       fn_output_signature=images.dtype)
  return tf.pad(images, [[0, size - tf.shape(slots)[0]], [0, 0], [0, 0],
                         [0, 0]])


def _all_rows(images, size, image_size, fn, seeds):
  """(ok, [size, H, W, 3]): every row decoded and padded, or ok False.

  One loop writes each real row once into a `size`-row TensorArray, whose
  unwritten rows stack as zeros: no separate scaling or padding pass over
  the whole set.
  """
  count = tf.shape(images)[0]

  def decode_all(_):
    rows = tf.TensorArray(tf.float32, size=size,
                          element_shape=[image_size, image_size, 3])

    def body(i, rows):
      image = scale(decode_resize(images[i], image_size))
      if fn is not None:
        image = fn(image, seeds[i])
      return i + 1, rows.write(i, image)

    _, rows = tf.while_loop(lambda i, _: i < count, body, (0, rows))
    return True, rows.stack()

  failed = tf.data.Dataset.from_tensors(
      (False, tf.zeros([0, image_size, image_size, 3])))
  return tf.data.Dataset.range(1).map(decode_all).ignore_errors(
  ).concatenate(failed).take(1).get_single_element()


def decode_rows(images: tf.Tensor, size: tf.Tensor, image_size: int,
                augmentation: DataAugmentation | None, seeds: tf.Tensor,
                describe, cache: DecodedImageCache | None = None,
                slots: tf.Tensor | None = None, extra=None,
                _rowwise=False) -> tf.Tensor:
  """Decodes, augments and zero-pads a set of images; names a failed one.

  All rows are decoded, scaled and augmented by one loop that writes each
  into a `size`-row TensorArray (unwritten rows stack as zeros), run as
  the single element of a nested `tf.data` pipeline with `ignore_errors`.
  Only if that fails are the rows run again one element each, so that the
  missing row fails an assertion whose message is `describe(row)` (file,
  record, class), instead of TF's bare "Invalid JPEG data" without any
  context. With a cache, a set whose images are all cached is one gather;
  otherwise rows go one element each (hits are gathers, misses decode and
  fill their slot).

  Args:
    images: [N] string tensor of encoded images.
    size: int32 scalar, the padded size (>= N).
    image_size: output height and width.
    augmentation: `DataAugmentation` or None.
    seeds: [N, 2] int64 per-image augmentation seeds.
    describe: callable, int32 row -> scalar string tensor naming the image;
      only run when that row failed.
    cache: optional `DecodedImageCache` (of this `image_size`).
    slots: [N] int32 cache slots, with `cache`.
    extra: optional `(image, seed) -> image` applied after `augmentation`
      (e.g. the SimCLR augmentation of `simclr.EpisodeAugmenter`).

  Returns:
    float32 [size, image_size, image_size, 3]: the N images in [-1, 1]
    (augmented), then zero rows.

  Raises:
    tf.errors.InvalidArgumentError (when run): an image failed to decode;
    the message is `describe` of the first such row.
  """
  count = tf.shape(images)[0]
  zeros = tf.zeros([image_size, image_size, 3])
  fn = _augment_fn(augmentation, extra)
  rowwise = lambda: decode_rows(images, size, image_size, augmentation,
                                seeds, describe, cache, slots, extra,
                                _rowwise=True)
  if cache is not None and not _rowwise:
    # Every image cached (the common case once warm): one gather, no
    # per-row work. Otherwise the row-by-row path below.
    return tf.cond(cache.all_filled(slots),
                   lambda: _from_cache(cache, slots, size, augmentation,
                                       seeds, extra),
                   rowwise)
  if not _rowwise:
    # Fast path: the whole set in one nested element (a loop over rows
    # inside one function, not one tf.data element per row). Only when it
    # fails does the row-by-row path run, to find and name the bad row.
    ok, out = _all_rows(images, size, image_size, fn, seeds)
    return tf.cond(ok, lambda: out, rowwise)

  def row(i):
    i = tf.cast(i, tf.int32)

    def real():
      if cache is None:
        image = decode_and_resize(images[i], image_size)
      else:
        image = cache.decode(images[i], slots[i])
      return image if fn is None else fn(image, seeds[i])

    return i, tf.cond(i < count, real, lambda: zeros)

  size64 = tf.cast(size, tf.int64)
  rows = tf.data.Dataset.range(size64).map(row).ignore_errors().batch(
      tf.maximum(size64, 1))  # A batch size must be positive.
  # When every row failed the batch is empty: fall back to an empty one.
  rows = rows.concatenate(tf.data.Dataset.from_tensors(
      (tf.zeros([0], tf.int32), tf.zeros([0, image_size, image_size, 3]))))
  index, out = rows.take(1).get_single_element()
  done = tf.shape(index)[0]
  # Rows keep their order, so the first failed row is the first i with
  # index[i] != i (or `done` when the failures are at the end).
  first_bad = tf.reduce_min(tf.concat(
      [tf.boolean_mask(tf.range(done), index != tf.range(done)), [done]], 0))
  check = tf.debugging.Assert(
      tf.equal(done, size),
      [tf.cond(tf.equal(done, size), lambda: tf.constant(""),
               lambda: describe(tf.minimum(first_bad, count - 1)))],
      summarize=1)
  with tf.control_dependencies([check]):
    return tf.identity(out)
