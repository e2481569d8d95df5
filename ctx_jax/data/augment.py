"""SimCLR v1 augmentation in JAX, for hosts whose CPUs cannot keep up.

The same ops, order and parameters as `meta_dataset_pipeline/simclr.py`
(which documents the official sources): random resized crop, horizontal
flip, colour jitter (brightness, contrast, saturation, hue in random order,
clipped after each) with probability p, greyscale with probability p, a clip
to [0, 1], and a Gaussian blur for query images; images in and out in
[-1, 1]. Pure JAX (no TensorFlow), batched with `vmap`, so it runs on the
accelerator inside `jit`, one key per image.

Not bit-identical to the TF version (different random streams, and small
op differences): the crop draws 10 (area, aspect ratio) candidates and keeps
the first that fits, else the whole image, as `sample_distorted_bounding_box`
does (whose `min_object_covered=0.1` makes the smallest area 0.1 rather than
0.08; here the configured area range is used as is); the resize is
`jax.image.scale_and_translate` with a cubic kernel (half-pixel centres);
hue goes through HSV as `tf.image.adjust_hue` does, saturation uses the
closed form of `meta_dataset_pipeline.simclr.adjust_saturation`.
"""

import dataclasses

import jax
from jax import numpy as jnp

_CROP_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Same fields and defaults as `meta_dataset_pipeline.SimCLRAugmentation`."""
  color_jitter_strength: float = 1.0
  crop: bool = True
  crop_area_range: tuple[float, float] = (0.08, 1.0)
  crop_aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  color_jitter_probability: float = 0.8
  grayscale_probability: float = 0.2
  query_blur: bool = True
  blur_sigma_range: tuple[float, float] = (0.1, 2.0)


def _crop_resize(image, key, params: AugmentParams):
  """Random resized crop of one [H, W, C] image, back to [H, W, C]."""
  h, w = image.shape[0], image.shape[1]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  lo, hi = params.crop_area_range
  area = jax.random.uniform(k_area, (_CROP_ATTEMPTS,), minval=lo, maxval=hi)
  r_lo, r_hi = params.crop_aspect_ratio_range
  log_ratio = jax.random.uniform(k_ratio, (_CROP_ATTEMPTS,),
                                 minval=jnp.log(r_lo * w / h),
                                 maxval=jnp.log(r_hi * w / h))
  ratio = jnp.exp(log_ratio)  # width / height
  ch = jnp.round(jnp.sqrt(area * h * w / ratio))
  cw = jnp.round(jnp.sqrt(area * h * w * ratio))
  fits = (ch >= 1) & (cw >= 1) & (ch <= h) & (cw <= w)
  first = jnp.argmax(fits)
  ok = fits[first]
  ch = jnp.where(ok, ch[first], h)
  cw = jnp.where(ok, cw[first], w)
  y0 = jnp.floor(jax.random.uniform(k_y) * (h - ch + 1))
  x0 = jnp.floor(jax.random.uniform(k_x) * (w - cw + 1))
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
