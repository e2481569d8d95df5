"""Rasterising the demo glyphs: one image per (class, image index).

Each image draws its class's glyph program (`glyphs.py`) under per-image
nuisances that carry no class information: an affine jitter and elastic
wobble, pen width, colours of either polarity, background shading and
blotches, clutter strokes, brightness/contrast jitter, blur, noise and JPEG
artefacts (the list and ranges are in `glyphs.py`'s docstring).
"""

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

from ctx_jax.demo import glyphs


def _interp_matrix(size: int, cells: int) -> np.ndarray:
  """(size, cells) linear-interpolation weights from a coarse grid."""
  pos = np.linspace(0.0, cells - 1.0, size)
  lo = np.minimum(np.floor(pos).astype(int), cells - 2)
  frac = pos - lo
  m = np.zeros((size, cells))
  m[np.arange(size), lo] = 1 - frac
  m[np.arange(size), lo + 1] = frac
  return m


def _smooth_field(rng: np.random.Generator, size: int, cells: int,
                  channels: int) -> np.ndarray:
  """A smooth random (size, size, channels) field, unit-ish amplitude."""
  coarse = rng.normal(size=(channels, cells, cells))
  m = _interp_matrix(size, cells)
  # Separable upsampling as two matmuls (einsum here is ~10x slower).
  return np.moveaxis(m @ coarse @ m.T, 0, -1)


def _luminance(rgb: np.ndarray) -> float:
  return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _random_colours(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
  """Foreground and background colours, in [0, 1], of either polarity.

  Colours are uniform in RGB, so they carry no class information; a minimum
  luminance contrast keeps the glyph visible.
  """
  while True:
    fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    if abs(_luminance(fg) - _luminance(bg)) >= 0.3:
      return fg, bg


def _draw_polyline(draw: ImageDraw.ImageDraw, points: np.ndarray,
                   width: float):
  """Draws a thick polyline with round joints and caps (pixel coords)."""
  w = max(1, int(round(width)))
  draw.line([tuple(p) for p in points], fill=255, width=w, joint="curve")
  r = w / 2
  for p in (points[0], points[-1]):
    draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=255)


def _to_canvas(points: np.ndarray, canvas: int) -> np.ndarray:
  """Normalised coordinates (y up) to canvas pixel coordinates (y down)."""
  return np.stack([(points[:, 0] + 1) / 2 * canvas,
                   (1 - points[:, 1]) / 2 * canvas], -1)


def _render_mask(strokes: Sequence[glyphs.Stroke], widths: Sequence[float],
                 size: int) -> np.ndarray:
  """Rasterises strokes into an antialiased (size, size) mask in [0, 1].

  Args:
    strokes: strokes in normalised coordinates (already transformed).
    widths: stroke width of each stroke, normalised units.
    size: output side in pixels.

  Returns:
    float32 coverage mask.
  """
  canvas = size * glyphs._SUPERSAMPLE
  img = Image.new("L", (canvas, canvas), 0)
  draw = ImageDraw.Draw(img)
  for stroke, width in zip(strokes, widths):
    pts = _to_canvas(stroke.points, canvas)
    if stroke.dot_radius > 0:
      r = stroke.dot_radius * canvas / 2
      x, y = pts[0]
      draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
      _draw_polyline(draw, pts, width * canvas / 2)
  img = img.resize((size, size), Image.Resampling.BOX)
  return np.asarray(img, np.float32) / 255.0


def _transform_glyph(strokes: Sequence[glyphs.Stroke],
                     rng: np.random.Generator) -> tuple[list[glyphs.Stroke], float]:
  """Applies an instance's elastic wobble and random affine map.

  Args:
    strokes: the class glyph.
    rng: the instance's random generator (consumed).

  Returns:
    The transformed strokes and the affine scale (for widths and dots).
  """
  # Elastic wobble: a smooth displacement field (a few random low-frequency
  # sinusoids) plus a small independent shift of each stroke, as a hand
  # never places strokes identically.
  freqs = rng.normal(0.0, 1.6, (2, 3, 2))
  phases = rng.uniform(0, 2 * math.pi, (2, 3))
  amps = rng.uniform(0.0, 0.035, (2, 3))
  angle = math.radians(rng.uniform(-20, 20))
  scale = rng.uniform(0.8, 1.1)
  aspect = math.exp(rng.uniform(-0.12, 0.12))
  shear = rng.uniform(-0.2, 0.2)
  shift = rng.uniform(-0.15, 0.15, 2)
  rot = np.array([[math.cos(angle), -math.sin(angle)],
                  [math.sin(angle), math.cos(angle)]])
  affine = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(
      [scale * aspect, scale / aspect])
  out = []
  for stroke in strokes:
    p = stroke.points + rng.normal(0.0, 0.03, 2)
    # (N, axis, component) phases of the sinusoids at every point.
    arg = np.einsum("nd,akd->nak", p, freqs) + phases
    p = p + (amps * np.sin(arg)).sum(-1)
    out.append(glyphs.Stroke(p @ affine.T + shift, stroke.dot_radius * scale))
  return out, scale


def _clutter(rng: np.random.Generator) -> tuple[list[glyphs.Stroke], list[float]]:
  """Random short thin strokes and specks anywhere in the image.

  They are not part of any class, so a model must learn to ignore them; they
  are thinner and fainter than glyph strokes so a human can still tell the
  glyph apart.
  """
  strokes, widths = [], []
  for _ in range(rng.integers(0, 5)):
    start = rng.uniform(-1, 1, 2)
    if rng.random() < 0.3:
      strokes.append(glyphs.Stroke(start[None], rng.uniform(0.02, 0.05)))
    else:
      strokes.append(glyphs.Stroke(glyphs._random_curve(rng, start,
                                          rng.uniform(0.15, 0.45))))
    widths.append(rng.uniform(0.025, 0.06))
  return strokes, widths


def render_instance(glyph: Sequence[glyphs.Stroke], rng: np.random.Generator,
                    image_size: int) -> np.ndarray:
  """Renders one random instance of a glyph.

  Args:
    glyph: the class's strokes, from `make_glyph`.
    rng: the instance's random generator (consumed).
    image_size: output side in pixels.

  Returns:
    (image_size, image_size, 3) uint8 RGB image.
  """
  strokes, scale = _transform_glyph(glyph, rng)
  # Pen width varies per instance and, a little, per stroke.
  pen = rng.uniform(0.06, 0.13) * scale
  widths = [pen * rng.uniform(0.85, 1.15) for _ in strokes]
  glyph_mask = _render_mask(strokes, widths, image_size)[..., None]
  clutter_strokes, clutter_widths = _clutter(rng)
  clutter_mask = _render_mask(clutter_strokes, clutter_widths,
                              image_size)[..., None]

  fg, bg = _random_colours(rng)
  clutter_colour = rng.uniform(0, 1, 3)
  clutter_alpha = rng.uniform(0.25, 0.6)
  # Background: colour + linear shading + smooth blotches, so the glyph is
  # not the only structure and the background is never flat.
  yy, xx = np.mgrid[-1:1:image_size * 1j, -1:1:image_size * 1j]
  shade_dir = glyphs._unit(rng.uniform(0, 2 * math.pi))
  shading = (xx * shade_dir[0] + yy * shade_dir[1])[..., None]
  background = (bg + rng.uniform(0.0, 0.15) * shading +
                rng.uniform(0.0, 0.08) *
                _smooth_field(rng, image_size, 5, 3))
  foreground = fg + rng.uniform(0.0, 0.05) * _smooth_field(
      rng, image_size, 4, 3)
  img = background * (1 - clutter_alpha * clutter_mask) + (
      clutter_colour * clutter_alpha * clutter_mask)
  img = img * (1 - glyph_mask) + foreground * glyph_mask
  # Global brightness / contrast jitter on top of the random colours.
  img = (img - 0.5) * rng.uniform(0.8, 1.1) + 0.5 + rng.uniform(-0.08, 0.08)
  img = np.clip(img, 0, 1)
  if rng.random() < 0.3:
    # Occasional defocus.
    pil = Image.fromarray((img * 255 + 0.5).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    img = np.asarray(pil, np.float32) / 255.0
  img = img + rng.normal(0.0, rng.uniform(0.0, 0.04), img.shape)
  return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_class(config: glyphs.DemoConfig, class_id: int,
                 num_images: int | None = None) -> list[np.ndarray]:
  """Renders the images of one class (uint8 RGB arrays).

  Args:
    config: the dataset config.
    class_id: absolute class id.
    num_images: how many; None for `config.images_per_class`.

  Returns:
    The images; image i is the same whatever `num_images` is.
  """
  glyph = glyphs.class_glyph(config, class_id)
  n = config.images_per_class if num_images is None else num_images
  return [render_instance(glyph, glyphs._rng(config.seed, 1, class_id, i),
                          config.image_size) for i in range(n)]


def encode_image(image: np.ndarray, image_format: str = "jpeg",
                 jpeg_quality: int = 75) -> bytes:
  """Encodes a uint8 RGB image as JPEG (baseline, 4:2:0) or PNG bytes."""
  buf = io.BytesIO()
  pil = Image.fromarray(image, "RGB")
  if image_format == "jpeg":
    pil.save(buf, format="JPEG", quality=jpeg_quality)
  else:
    pil.save(buf, format="PNG", optimize=False)
  return buf.getvalue()
