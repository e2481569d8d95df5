"""SimCLR episodes (CrossTransformers) and the SimCLR / BOHB augmentations.

A SimCLR episode turns an ordinary Meta-Dataset episode into an instance
discrimination task: every support image is its own class, and each query is
another augmented view of one support image. CTX+SimCLR Eps converts half of
the training episodes, which counters supervision collapse.

Official semantics this module follows (google-research/meta-dataset at
1676095, and google-research/simclr `data_util.py`, which the official
`setup.py` downloads as the `simclr` package):

- Which episodes: `meta_dataset/data/pipeline.py:add_simclr_episodes` keeps
  an episode when a uniform draw exceeds `simclr_episode_fraction`, else
  converts it, i.e. P(convert) = fraction, independently per episode. The
  fraction is `EpisodeDescriptionConfig.simclr_episode_fraction`
  (`data/config.py`), 0 by default (`learn/gin/setups/data_config_common.gin`)
  and 0.5 for training in `learn/gin/default/
  crosstransformer_simclreps_imagenet.gin`.
- Which images (`convert_to_simclr_episode` in the same function): if the
  query set holds k images of class c, the first k support images of class c
  (in support order) become the queries; the new query set is those support
  images in support order, the support labels become the support indices
  (`tf.range(num_support)`), each query's label is the index of its support
  image, the support class ids are kept and each query gets its support
  image's class id. Upstream pairs by per-set `tf.unique` labels; here the
  pairing is by absolute class id, which is what the upstream comment means
  (the two coincide whenever both sets list classes in the same order).
- Augmentation (`simclr_augment` in the same file): images in [-1, 1] are
  mapped to [0, 1], each image of both sets goes through
  `data_util.preprocess_for_train(x, h, w, impl='simclrv1')`, the query
  images additionally through `data_util.random_blur(x, h, w)` (p=1), and
  the result is mapped back to [-1, 1]. The colour strength is the flag
  `color_jitter_strength` (default 1.0, declared in `data/pipeline.py`).
- `simclr/data_util.py`: `preprocess_for_train` = `random_crop_with_resize`
  (`crop_and_resize`: `sample_distorted_bounding_box` with
  min_object_covered 0.1, aspect ratio in [3/4, 4/3] * w/h, area in
  [0.08, 1], 100 attempts, whole image as fallback; bicubic resize), then
  `random_flip_left_right`, then `random_color_jitter` (`color_jitter` with
  p=0.8: brightness 0.8s, contrast 0.8s, saturation 0.8s, hue 0.2s in random
  order, `color_jitter_rand`, clipping to [0, 1] after each op; simclrv1
  brightness is additive, `tf.image.random_brightness`; then `to_grayscale`
  with p=0.2), then a clip to [0, 1]. `random_blur`: sigma ~ U(0.1, 2.0),
  kernel `height // 10` made odd (radius = size // 2, size = 2 radius + 1),
  separable Gaussian, 'SAME' zero padding.

Differences, deliberate: randomness is stateless (each image's seed comes
from the pipeline's per-image `aug_seeds`, and whether an episode is
converted from the seed and the episode's index), so the same seed gives the
same episodes; the query copies are decoded from the same encoded bytes
instead of being sliced out of the decoded support tensor (same pixels; the
original query records, which the episode no longer shows, are not read:
the records are read by offset, so the class streams' state is unchanged);
the resize after cropping is `tf.image.resize(..., 'bicubic')` (half-pixel
centres) where upstream uses `tf.compat.v1.image.resize_bicubic`; the blur
is computed as two banded matrix products and the saturation change in
closed form (both equal to upstream's ops up to float rounding, and about
2-3x cheaper per image on a CPU); a final clip to [-1, 1] removes the
blur's rounding excess.

The "BOHB" augmentation of the paper's CTX+SimCLR Eps+Aug row is not in the
official code: its CTX gin files set no augmentation (the data config's
jitter and noise are of zero strength), the README only links the
checkpoint `ctx_simclreps_bohbaug.zip`, and the leaderboard notebook lists
"BOHB-inspired data augmentation", after the augmentation that BOHB
hyper-parameter search found in Saikia et al. (2020). Neither its ops nor
its settings are given there, and the paper's text was not available to us.
`BOHB_AUGMENTATION` is therefore our reading: the SimCLR crop / flip /
colour-jitter / greyscale ops, milder (area 0.25-1, strength 0.5, no
blur), applied to every image of the ordinary (non-SimCLR) training
episodes. Its settings are NOT verified; every field can be overridden
(`augmentation_by_name("bohb", **fields)`, `config.data.bohb.*` in
ctx-train configs).

Episode outputs of a SimCLR episode keep the usual keys: `support_labels` =
0..S-1, `num_ways` = S (the number of real support images),
`query_labels` = index of the query's source support image, and
`*_class_ids` = the absolute class id of the image the row was made from
(so class ids repeat across labels: they describe provenance, not labels).
"""

import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

from meta_dataset_pipeline import augmentation

# Stream key of the per-episode "convert?" draws (`reader.derive_seeds`);
# 1..6 are taken by the reader and pipeline.
_CONVERT_STREAM = 7
# Fold-in constant separating these augmentations' seeds from the decoder's.
_AUG_FOLD = 0x51C1


# The settings live in the TF-free `augmentation.py` (the on-device
# augmentation of ctx_jax reads the same dataclass); re-exported here.
SimCLRAugmentation = augmentation.SimCLRAugmentation
SIMCLR_AUGMENTATION = augmentation.SIMCLR_AUGMENTATION
BOHB_AUGMENTATION = augmentation.BOHB_AUGMENTATION
DEVICE_NONE = augmentation.DEVICE_NONE
DEVICE_MD = augmentation.DEVICE_MD
DEVICE_SIMCLR = augmentation.DEVICE_SIMCLR
MD_AUGMENTATIONS = augmentation.MD_AUGMENTATIONS
augmentation_by_name = augmentation.augmentation_by_name


def is_simclr_episode(seed, episode_index: int, fraction: float) -> bool:
  """Whether episode `episode_index` of a stream seeded `seed` is converted.

  A stateless draw per (seed, index), so a stream can start at any episode
  and still convert the same ones.

  Args:
    seed: the pipeline seed (int or sequence of ints).
    episode_index: position of the episode in the stream.
    fraction: `simclr_episode_fraction` in [0, 1].

  Returns:
    True with probability `fraction`.
  """
  if fraction <= 0:
    return False
  if fraction >= 1:
    return True
  entropy = [int(s) for s in np.atleast_1d(seed)]
  seq = np.random.SeedSequence(entropy + [_CONVERT_STREAM, int(episode_index)])
  u = seq.generate_state(1, np.uint64)[0] / float(2**64)
  return bool(u < fraction)


def simclr_query_rows(support_class_ids: np.ndarray,
                      query_class_ids: np.ndarray) -> np.ndarray:
  """Support rows that become the queries of the SimCLR episode.

  For each class with k queries, the first min(k, shots) support rows of
  that class, returned in support order (as upstream's boolean mask).

  Args:
    support_class_ids: [S] class of each support row.
    query_class_ids: [Q] class of each query row.

  Returns:
    int64 [Q'] increasing support indices, Q' <= Q.
  """
  support_class_ids = np.asarray(support_class_ids)
  classes, query_counts = np.unique(query_class_ids, return_counts=True)
  # Rank of each support row among the support rows of its class.
  order = np.argsort(support_class_ids, kind="stable")
  sorted_ids = support_class_ids[order]
  starts = np.searchsorted(sorted_ids, sorted_ids, side="left")
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order)) - starts
  where = np.searchsorted(classes, support_class_ids)
  where = np.minimum(where, max(len(classes) - 1, 0))
  in_query = (len(classes) > 0) & (classes[where] == support_class_ids)
  wanted = np.where(in_query, query_counts[where], 0)
  return np.flatnonzero(rank < wanted)


def convert_episode(images, class_ids, num_support: int):
  """The SimCLR version of one episode's rows (support rows first).

  Args:
    images: per-row encoded images (any sequence), support then query.
    class_ids: [S + Q] absolute class ids.
    num_support: S.

  Returns:
    (images, labels, class_ids, num_ways): the new rows (the S support rows,
    then the Q' query copies), labels int32 (support indices), class ids
    int32 and num_ways = S.
  """
  class_ids = np.asarray(class_ids, np.int32)
  rows = simclr_query_rows(class_ids[:num_support], class_ids[num_support:])
  new_images = list(images[:num_support]) + [images[i] for i in rows]
  labels = np.concatenate([np.arange(num_support), rows]).astype(np.int32)
  new_ids = np.concatenate([class_ids[:num_support], class_ids[rows]])
  return new_images, labels, new_ids.astype(np.int32), num_support


# ---------------------------------------------------------------------------
# Augmentations (TF, one image, stateless).


def _blur_matrix(sigma, size: int, radius: int):
  """[size, size] matrix M with (M x)[i] = sum_j k[j - i] x[j], |j - i| <= r.

  Applying it along an axis is the 1-D Gaussian convolution with zero
  'SAME' padding; two small matmuls are much cheaper on a CPU than two
  per-image depthwise convolutions.
  """
  idx = tf.range(size)
  diff = tf.cast(idx[tf.newaxis, :] - idx[:, tf.newaxis], tf.float32)
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  norm = tf.reduce_sum(tf.exp(-tf.square(t) / (2.0 * tf.square(sigma))))
  weights = tf.exp(-tf.square(diff) / (2.0 * tf.square(sigma))) / norm
  return tf.where(tf.abs(diff) <= radius, weights, 0.0)


def gaussian_blur(image: tf.Tensor, sigma, kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur with zero 'SAME' padding (upstream's).

  Args:
    image: float32 [H, W, C].
    sigma: scalar, in pixels.
    kernel_size: made odd as upstream: radius = kernel_size // 2.

  Returns:
    The blurred image, same shape.
  """
  radius = kernel_size // 2
  if radius == 0:
    return image
  h, w = image.shape[0], image.shape[1]
  sigma = tf.cast(sigma, tf.float32)
  x = tf.einsum("hwc,vw->hvc", image, _blur_matrix(sigma, w, radius))
  return tf.einsum("hwc,gh->gwc", x, _blur_matrix(sigma, h, radius))


def _random_crop_resize(image, aug: SimCLRAugmentation, seed):
  h, w = image.shape[0], image.shape[1]
  lo, hi = aug.crop_aspect_ratio_range
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=(lo * w / h, hi * w / h),
      area_range=aug.crop_area_range, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  crop.set_shape([None, None, image.shape[2]])
  return tf.image.resize(crop, [h, w], method="bicubic")


def adjust_saturation(image, factor):
  """`tf.image.adjust_saturation` in closed form (equal up to rounding).

  Scaling HSV saturation by f, clipped to 1, at fixed hue and value moves
  each channel c to v - (v - c) * min(f, v / (v - min)); no HSV round trip,
  about 3x faster per image on a CPU.
  """
  v = tf.reduce_max(image, -1, keepdims=True)
  low = tf.reduce_min(image, -1, keepdims=True)
  return v - (v - image) * tf.minimum(factor, tf.math.divide_no_nan(
      v, v - low))


def _color_jitter(image, strength: float, seed):
  """SimCLR v1 colour jitter: the four ops in random order, clipped."""
  b, c, s, hue = (0.8 * strength, 0.8 * strength, 0.8 * strength,
                  min(0.2 * strength, 0.5))
  seeds = tf.random.experimental.stateless_split(seed, 5)
  ops = [
      lambda x: tf.image.stateless_random_brightness(x, b, seeds[0]),
      lambda x: tf.image.stateless_random_contrast(
          x, max(1 - c, 0.0), 1 + c, seeds[1]),
      lambda x: adjust_saturation(x, tf.random.stateless_uniform(
          [], seeds[2], max(1 - s, 0.0), 1 + s)),
      lambda x: tf.image.stateless_random_hue(x, hue, seeds[3]),
  ]
  active = [i for i, amount in enumerate((b, c, s, hue)) if amount > 0]
  if not active:
    return image
  # A uniformly random order, as upstream's `tf.random_shuffle(range(4))`.
  # (One 24-way `switch_case` over whole orders measured slower.)
  order = tf.argsort(tf.random.stateless_uniform([len(active)], seeds[4]))
  branches = [ops[i] for i in active]
  for k in range(len(active)):
    image = tf.switch_case(order[k],
                           [functools.partial(f, image) for f in branches])
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def _maybe(p: float, u, fn, image):
  if p <= 0:
    return image
  if p >= 1:
    return fn(image)
  return tf.cond(u < p, lambda: fn(image), lambda: image)


def augment_image(image: tf.Tensor, seed: tf.Tensor,
                  aug: SimCLRAugmentation, blur: bool = False) -> tf.Tensor:
  """SimCLR v1 augmentation of one image in [-1, 1] (upstream order).

  Crop-and-resize, flip, colour jitter (p), greyscale (p), clip, then the
  Gaussian blur when `blur`. Every draw is stateless from `seed`.

  Args:
    image: float32 [H, W, 3] in [-1, 1], static H and W.
    seed: int [2] tensor.
    aug: the settings.
    blur: blur the image (query images of SimCLR episodes).

  Returns:
    float32 [H, W, 3] in [-1, 1].
  """
  h = image.shape[0]
  seed = tf.random.experimental.stateless_fold_in(
      tf.cast(seed, tf.int64), _AUG_FOLD)
  seeds = tf.random.experimental.stateless_split(seed, 6)
  u = tf.random.stateless_uniform([2], seeds[5])
  x = (image + 1.0) / 2.0
  if aug.crop:
    x = _random_crop_resize(x, aug, seeds[0])
  if aug.flip:
    x = tf.image.stateless_random_flip_left_right(x, seeds[1])
  x = _maybe(aug.color_jitter_probability, u[0],
             lambda y: _color_jitter(y, aug.color_jitter_strength, seeds[2]),
             x)
  x = _maybe(aug.grayscale_probability, u[1],
             lambda y: tf.tile(tf.image.rgb_to_grayscale(y), [1, 1, 3]), x)
  x = tf.clip_by_value(x, 0.0, 1.0)
  if blur:
    lo, hi = aug.blur_sigma_range
    sigma = tf.random.stateless_uniform([], seeds[3], lo, hi)
    x = gaussian_blur(x, sigma, h // 10)
  # The blur is a convex combination; the clip only removes rounding.
  return tf.clip_by_value(x * 2.0 - 1.0, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class EpisodeAugmenter:
  """What the episode map applies after decoding, per row.

  Attributes:
    simclr: augmentation of SimCLR episodes (None: SimCLR episodes off).
    simclr_episode_fraction: fraction of episodes converted.
    md: augmentation of ordinary episodes (e.g. `BOHB_AUGMENTATION`), or
      None.
    on_host: augment in the tf.data map (True), or leave the images as
      decoded and emit, per row, the seed and what to apply
      (`device_fields`), for `ctx_jax.data.augment` on the accelerator.
  """
  simclr: SimCLRAugmentation | None = None
  simclr_episode_fraction: float = 0.0
  md: SimCLRAugmentation | None = None
  on_host: bool = True

  def __post_init__(self):
    f = self.simclr_episode_fraction
    if not 0.0 <= f <= 1.0 or math.isnan(f):
      raise ValueError(
          f"simclr_episode_fraction must be in [0, 1], got {f}")

  @property
  def converts(self) -> bool:
    return self.simclr_episode_fraction > 0

  @property
  def active(self) -> bool:
    return self.converts or self.md is not None

  @property
  def augments_in_map(self) -> bool:
    return self.active and self.on_host

  def device_fields(self, prefix: str, seeds, num_rows, size: int,
                    is_simclr) -> dict[str, tf.Tensor]:
    """Per-row inputs of on-device augmentation, padded to `size` rows.

    `<prefix>aug_seeds` int32 [size, 2] (the rows' stateless seeds) and
    `<prefix>aug_mode` int32 [size]: DEVICE_NONE on padding (and on
    ordinary episodes without `md`), DEVICE_MD, or DEVICE_SIMCLR.
    """
    if self.on_host or not self.active:
      return {}
    ordinary = DEVICE_MD if self.md is not None else DEVICE_NONE
    mode = tf.where(is_simclr, DEVICE_SIMCLR, ordinary)
    rows = tf.range(size)
    pad = [[0, size - tf.shape(seeds)[0]], [0, 0]]
    return {
        # The seeds are < 2**31: int32 keeps JAX (without x64) exact.
        prefix + "aug_seeds": tf.cast(tf.pad(seeds, pad), tf.int32),
        prefix + "aug_mode": tf.where(rows < num_rows, mode, DEVICE_NONE),
    }

  def __call__(self, image, seed, is_query: bool, is_simclr):
    """Augments one decoded row; `is_simclr` is a scalar bool tensor."""
    simclr_aug = self.simclr or SIMCLR_AUGMENTATION

    def simclr_view():
      return augment_image(image, seed, simclr_aug,
                           blur=is_query and simclr_aug.query_blur)

    def md_view():
      if self.md is None:
        return image
      return augment_image(image, seed, self.md,
                           blur=is_query and self.md.query_blur)

    if not self.converts:
      return md_view()
    return tf.cond(is_simclr, simclr_view, md_view)
