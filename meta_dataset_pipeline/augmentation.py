"""Augmentation settings: SimCLR episodes and ordinary-episode augmentation.

Plain dataclasses without TensorFlow, so that both the tf.data augmentation
(`simclr.py`) and the on-device JAX augmentation (`ctx_jax/data/augment.py`)
read the same definition of every setting and default.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class SimCLRAugmentation:
  """SimCLR v1 style augmentation settings (defaults: `simclr/data_util`).

  Attributes:
    color_jitter_strength: s; brightness, contrast and saturation change by
      up to 0.8 s, hue by up to 0.2 s (official flag of the same name).
    crop: random resized crop.
    crop_area_range: fraction of the image area kept by the crop.
    crop_aspect_ratio_range: crop aspect ratio range (times w / h).
    flip: random horizontal flip (p = 0.5).
    color_jitter_probability: probability of the colour jitter.
    grayscale_probability: probability of greyscale (after the jitter).
    query_blur: Gaussian blur on query images (p = 1 upstream).
    blur_sigma_range: blur sigma range, in pixels.
  """
  color_jitter_strength: float = 1.0
  crop: bool = True
  crop_area_range: tuple[float, float] = (0.08, 1.0)
  crop_aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  color_jitter_probability: float = 0.8
  grayscale_probability: float = 0.2
  query_blur: bool = True
  blur_sigma_range: tuple[float, float] = (0.1, 2.0)

  def __post_init__(self):
    for name in ("crop_area_range", "crop_aspect_ratio_range",
                 "blur_sigma_range"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f"SimCLRAugmentation.{name} must be (low, high) with "
                         f"0 < low <= high, got {(lo, hi)}")
    if self.color_jitter_strength < 0:
      raise ValueError("SimCLRAugmentation.color_jitter_strength must be "
                       f">= 0, got {self.color_jitter_strength}")
    for name in ("color_jitter_probability", "grayscale_probability"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"SimCLRAugmentation.{name} must be in [0, 1]")


SIMCLR_AUGMENTATION = SimCLRAugmentation()
# Our reading of the paper's BOHB augmentation (see the module docstring):
# the same ops on ordinary episodes, milder crops, no blur. Unverified.
BOHB_AUGMENTATION = SimCLRAugmentation(
    color_jitter_strength=0.5, crop_area_range=(0.25, 1.0), query_blur=False)
# `aug_mode` values of on-device augmentation (`EpisodeAugmenter.on_host`
# False; `ctx_jax/data/augment.py` reads them).
DEVICE_NONE, DEVICE_MD, DEVICE_SIMCLR = 0, 1, 2
# Names accepted by `augmentation_by_name` (config strings).
MD_AUGMENTATIONS = ("none", "bohb")


def augmentation_by_name(name: str, **overrides) -> SimCLRAugmentation | None:
  """The ordinary-episode augmentation called `name` ("none" or "bohb").

  Args:
    name: "none" or "bohb".
    **overrides: `SimCLRAugmentation` fields replacing those of the named
      augmentation (e.g. `color_jitter_strength=0.3`), for "bohb" only.

  Raises:
    ValueError: an unknown name or field, a bad value, or overrides of
      "none".
  """
  if name not in MD_AUGMENTATIONS:
    raise ValueError(f"unknown episode augmentation '{name}'; known: "
                     f"{list(MD_AUGMENTATIONS)}")
  if name == "none":
    if overrides:
      raise ValueError(f"settings {sorted(overrides)} given for episode "
                       "augmentation 'none'")
    return None
  fields = {f.name for f in dataclasses.fields(SimCLRAugmentation)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown augmentation setting(s) {unknown}; known: "
                     f"{sorted(fields)}")
  return dataclasses.replace(BOHB_AUGMENTATION, **{
      k: tuple(v) if isinstance(v, list) else v
      for k, v in overrides.items()})


# ---------------------------------------------------------------------------
# Episode conversion (numpy, in the episode generator).
