"""SimCLR v1 augmentation in JAX, for hosts whose CPUs cannot keep up.

The same ops, order and parameters as `meta_dataset_pipeline/simclr.py`
(which documents the official sources): random resized crop, horizontal
flip, colour jitter (brightness, contrast, saturation, hue in random order,
clipped after each) with probability p, greyscale with probability p, a clip
to [0, 1], and a Gaussian blur for query images; images in and out in
[-1, 1]. Pure JAX (no TensorFlow), batched with `vmap`, so it runs on the
accelerator inside `jit`, one key per image.

Not bit-identical to the TF version (different random streams, and small
op differences), but the crop box has the same distribution as TF's
`sample_distorted_bounding_box` with the arguments `simclr.py` passes
(`sample_crop_box`: the kernel's algorithm, checked statistically against TF
in tests/augment_crop_test.py); the resize is
`jax.image.scale_and_translate` with a cubic kernel (half-pixel centres);
hue goes through HSV as `tf.image.adjust_hue` does, saturation uses the
closed form of `meta_dataset_pipeline.simclr.adjust_saturation`.
"""

import jax
from jax import numpy as jnp

from meta_dataset_pipeline import augmentation

# `sample_distorted_bounding_box` as `simclr.py` calls it.
CROP_MAX_ATTEMPTS = 100
CROP_MIN_OBJECT_COVERED = 0.1


# The settings: the pipeline's dataclass (TF-free), one definition for the
# tf.data and the on-device augmentation.
AugmentParams = augmentation.SimCLRAugmentation


def sample_crop_box(key: jax.Array, h: int, w: int,
                    area_range: tuple[float, float],
                    aspect_ratio_range: tuple[float, float],
                    max_attempts: int = CROP_MAX_ATTEMPTS,
                    min_object_covered: float = CROP_MIN_OBJECT_COVERED):
  """A crop box distributed as TF's `sample_distorted_bounding_box`'s.

  The TF kernel (`core/kernels/image/sample_distorted_bounding_box_op.cc`,
  with no boxes and `use_image_if_no_bounding_boxes`): each attempt draws an
  aspect ratio (width / height) uniformly in `aspect_ratio_range`; the
  height is uniform over the integers from round(sqrt(min_area / ratio)) to
  round(sqrt(max_area / ratio)) (capped so that the width and height fit),
  width = round(height * ratio), nudged by one row if rounding left the area
  outside the range; the attempt fails if the box still does not fit or
  covers less than `min_object_covered` of the image. Offsets are uniform
  in [0, H - height) and [0, W - width) (0 when the box spans the image).
  The first of `max_attempts` successes is used, else the whole image. All
  attempts are drawn at once and the first success picked, which gives the
  same distribution as TF's sequential loop.

  Args:
    key: a PRNG key.
    h: image height.
    w: image width.
    area_range: (min, max) fraction of the image area.
    aspect_ratio_range: (min, max) width / height of the box.
    max_attempts: attempts before falling back to the whole image.
    min_object_covered: smallest fraction of the image the box must cover.

  Returns:
    (y, x, height, width) as int32 scalars.
  """
  k_ratio, k_height, k_y, k_x = jax.random.split(key, 4)
  f32 = jnp.float32
  r_lo, r_hi = aspect_ratio_range
  ratio = (jax.random.uniform(k_ratio, (max_attempts,), f32) * (r_hi - r_lo)
           + r_lo).astype(f32)
  min_area = f32(area_range[0]) * f32(w) * f32(h)
  max_area = f32(area_range[1]) * f32(w) * f32(h)
  rint = lambda v: jnp.rint(v).astype(jnp.int32)  # lrintf: half to even.
  height = rint(jnp.sqrt(min_area / ratio))
  max_height = rint(jnp.sqrt(max_area / ratio))
  too_wide = rint(max_height * ratio) > w
  capped = jnp.floor((f32(w) + f32(0.5) - f32(1e-7)) / ratio).astype(
      jnp.int32)
  capped = jnp.where(rint(capped * ratio) > w, capped - 1, capped)
  max_height = jnp.minimum(jnp.where(too_wide, capped, max_height), h)
  height = jnp.minimum(height, max_height)
  # Uniform integer in the closed range [0, max_height - height].
  span = jnp.maximum(max_height - height + 1, 1)
  u = jax.random.uniform(k_height, (max_attempts,), f32)
  height = height + jnp.minimum(jnp.floor(u * span).astype(jnp.int32),
                                span - 1)
  width = rint(height * ratio)
  area = (width * height).astype(f32)
  grow = area < min_area
  height = jnp.where(grow, height + 1, height)
  width = jnp.where(grow, rint(height * ratio), width)
  area = (width * height).astype(f32)
  shrink = area > max_area
  height = jnp.where(shrink, height - 1, height)
  width = jnp.where(shrink, rint(height * ratio), width)
  area = (width * height).astype(f32)
  ok = ((area >= min_area) & (area <= max_area) & (width <= w) & (height <= h)
        & (width > 0) & (height > 0) & (area >= 1)
        & (area / f32(w * h) >= f32(min_object_covered)))
  first = jnp.argmax(ok)
  found = ok[first]
  ch = jnp.where(found, height[first], h)
  cw = jnp.where(found, width[first], w)

  def offset(k, size, full):  # Uniform in [0, full - size), 0 if none.
    n = jnp.maximum(full - size, 1)
    v = jnp.floor(jax.random.uniform(k, (), f32) * n).astype(jnp.int32)
    return jnp.where(size < full, jnp.minimum(v, n - 1), 0)

  return offset(k_y, ch, h), offset(k_x, cw, w), ch, cw


def _crop_resize(image, key, params: AugmentParams):
  """Random resized crop of one [H, W, C] image, back to [H, W, C]."""
  h, w = image.shape[0], image.shape[1]
  r_lo, r_hi = params.crop_aspect_ratio_range
  y0, x0, ch, cw = sample_crop_box(key, h, w, params.crop_area_range,
                                   (r_lo * w / h, r_hi * w / h))
  y0, x0, ch, cw = (v.astype(jnp.float32) for v in (y0, x0, ch, cw))
  scale = jnp.stack([h / ch, w / cw])
  translation = -jnp.stack([y0, x0]) * scale
  return jax.image.scale_and_translate(
      image, image.shape, (0, 1), scale, translation, method="cubic",
      antialias=False)


def _gray(x):
  return x @ jnp.array([0.2989, 0.587, 0.114], x.dtype)


def rgb_to_hsv(x):
  """[..., 3] RGB in [0, 1] to HSV (hue in [0, 1)), as tf.image."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = jnp.max(x, -1)
  mn = jnp.min(x, -1)
  delta = v - mn
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1), 0)
  safe = jnp.where(delta > 0, delta, 1)
  hue = jnp.where(v == r, (g - b) / safe,
                  jnp.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
  hue = jnp.where(delta > 0, (hue / 6) % 1.0, 0)
  return jnp.stack([hue, s, v], -1)


def hsv_to_rgb(x):
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  k = lambda n: (n + h * 6) % 6
  f = lambda n: v - v * s * jnp.clip(jnp.minimum(k(n), 4 - k(n)), 0, 1)
  return jnp.stack([f(5), f(3), f(1)], -1)


def _color_jitter(x, key, strength: float):
  """SimCLR v1 jitter of one image in [0, 1]: random order, clipped."""
  b, c, s, hue = 0.8 * strength, 0.8 * strength, 0.8 * strength, min(
      0.2 * strength, 0.5)
  k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  delta_b = jax.random.uniform(k_b, minval=-b, maxval=b)
  f_c = jax.random.uniform(k_c, minval=max(1 - c, 0.0), maxval=1 + c)
  f_s = jax.random.uniform(k_s, minval=max(1 - s, 0.0), maxval=1 + s)
  delta_h = jax.random.uniform(k_h, minval=-hue, maxval=hue)

  def brightness(y):
    return y + delta_b

  def contrast(y):
    mean = jnp.mean(y, axis=(0, 1), keepdims=True)
    return (y - mean) * f_c + mean

  def saturation(y):  # HSV saturation x f_s, clipped, in closed form.
    v = jnp.max(y, -1, keepdims=True)
    spread = v - jnp.min(y, -1, keepdims=True)
    ratio = jnp.where(spread > 0, v / jnp.where(spread > 0, spread, 1), 0)
    return v - (v - y) * jnp.minimum(f_s, ratio)

  def hue_shift(y):
    hsv = rgb_to_hsv(y)
    return hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + delta_h) % 1.0))

  ops = (brightness, contrast, saturation, hue_shift)
  order = jax.random.permutation(k_order, 4)
  for i in range(4):
    x = jnp.clip(jax.lax.switch(order[i], ops, x), 0.0, 1.0)
  return x


def _blur(x, sigma, kernel_size: int):
  """Separable Gaussian blur, zero 'SAME' padding, of one [H, W, C]."""
  radius = kernel_size // 2
  if radius == 0:
    return x
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-t ** 2 / (2 * sigma ** 2))
  k = k / jnp.sum(k)
  pad = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)))
  h, w = x.shape[0], x.shape[1]
  rows = sum(k[i] * pad[:, i:i + w] for i in range(2 * radius + 1))
  return sum(k[i] * rows[i:i + h] for i in range(2 * radius + 1))


def augment_image(image: jax.Array, key: jax.Array, params: AugmentParams,
                  blur: bool = False) -> jax.Array:
  """SimCLR v1 augmentation of one [H, W, 3] image in [-1, 1].

  Args:
    image: float [H, W, 3] in [-1, 1].
    key: a PRNG key.
    params: the settings.
    blur: also blur (query images of SimCLR episodes); static.

  Returns:
    float32 [H, W, 3] in [-1, 1].
  """
  k_crop, k_flip, k_jit, k_gray, k_blur, k_apply = jax.random.split(key, 6)
  x = (image.astype(jnp.float32) + 1.0) / 2.0
  if params.crop:
    x = _crop_resize(x, k_crop, params)
  if params.flip:
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
  u = jax.random.uniform(k_apply, (2,))
  if params.color_jitter_probability > 0:
    x = jnp.where(u[0] < params.color_jitter_probability,
                  _color_jitter(x, k_jit, params.color_jitter_strength), x)
  if params.grayscale_probability > 0:
    gray = jnp.repeat(_gray(x)[..., None], 3, -1)
    x = jnp.where(u[1] < params.grayscale_probability, gray, x)
  x = jnp.clip(x, 0.0, 1.0)
  if blur:
    lo, hi = params.blur_sigma_range
    sigma = jax.random.uniform(k_blur, minval=lo, maxval=hi)
    x = _blur(x, sigma, image.shape[0] // 10)
  # The blur is a convex combination; the clip only removes rounding.
  return jnp.clip(x * 2.0 - 1.0, -1.0, 1.0)


def augment_batch(images: jax.Array, keys: jax.Array, params: AugmentParams,
                  blur: bool = False,
                  enabled: jax.Array | bool = True) -> jax.Array:
  """`augment_image` over [N, H, W, 3] with keys [N]; rows where `enabled`
  is False (e.g. padding, or ordinary episodes) pass through unchanged.

  Args:
    images: [N, H, W, 3] in [-1, 1].
    keys: [N] PRNG keys (e.g. `jax.random.split(key, N)`).
    params: the settings (static).
    blur: blur every row if `params.query_blur` (query rows); static.
    enabled: bool, scalar or [N].

  Returns:
    float32 [N, H, W, 3].
  """
  n = images.shape[0]
  blur = bool(blur) and params.query_blur
  enabled = jnp.broadcast_to(jnp.asarray(enabled), (n,))
  out = jax.vmap(lambda x, k: augment_image(x, k, params, blur))(images,
                                                                 keys)
  return jnp.where(enabled[:, None, None, None], out,
                   images.astype(jnp.float32))


# `aug_mode` values written by the pipeline (`meta_dataset_pipeline.simclr`).
MODE_NONE, MODE_MD, MODE_SIMCLR = 0, 1, 2
DEVICE_KEYS = ("support_aug_seeds", "support_aug_mode", "query_aug_seeds",
               "query_aug_mode")


def augment_episode(episode: dict[str, jax.Array], simclr: AugmentParams,
                    md: AugmentParams | None = None) -> dict[str, jax.Array]:
  """Augments an episode made with `augment_on_device=True`, on device.

  Rows with `aug_mode` MODE_SIMCLR get `simclr` (query rows blurred), rows
  with MODE_MD get `md`, the rest (padding) pass through. Each row's key
  comes from its pipeline seed, so the result depends only on the episode.

  Args:
    episode: device arrays with the `DEVICE_KEYS` and the image keys.
    simclr: settings of SimCLR episodes (static).
    md: settings of ordinary episodes, or None (static).

  Returns:
    A copy of `episode` with augmented `support_images` and `query_images`
    and without the `DEVICE_KEYS`.
  """
  out = dict(episode)
  for prefix, is_query in (("support_", False), ("query_", True)):
    images = episode[prefix + "images"]
    seeds = episode[prefix + "aug_seeds"].astype(jnp.uint32)
    keys = jax.random.wrap_key_data(seeds, impl="threefry2x32")
    mode = episode[prefix + "aug_mode"]
    result = augment_batch(images, keys, simclr, is_query,
                           mode == MODE_SIMCLR)
    if md is not None:
      result = jnp.where(
          (mode == MODE_MD)[:, None, None, None],
          augment_batch(images, keys, md, is_query, True), result)
    out[prefix + "images"] = result.astype(images.dtype)
  for key in DEVICE_KEYS:  # Consumed: the train step never sees them.
    del out[key]
  return out
