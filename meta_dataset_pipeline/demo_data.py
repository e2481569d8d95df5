r"""Embedded demo dataset: procedurally rendered glyphs, nothing to download.

    ctx-make-demo-data --output_dir demo_data/glyphs

writes a few-shot dataset in the official Meta-Dataset record format (one
`<class_id>.tfrecords` per class plus `dataset_spec.json`, see
`records_writer`) that CTX can train and be evaluated on with a 2-core CPU.
Defaults: 100 classes x 40 images, 64x64 RGB JPEGs (quality 75, as the
official converters), 5.5 MB, about 20 s on one core.

Classes. Each class is a random "character": 2-4 strokes (lines, quadratic
and cubic Bezier curves, arcs, zigzags) drawn by a class-specific random
program; most strokes start on an earlier one, as in handwriting, and some
glyphs get a diacritic-like dot. Classes come in families of 4 consecutive
ids that share 1-2 strokes (like letters of one alphabet) and add 1-2
strokes of their own, so most 5-way episodes hold look-alike classes.

Split. A flat `DatasetSpecification`: 64 train (ids 0-63), 16 valid
(64-79) and 20 test (80-99) classes. Classes and families are disjoint
across splits: test glyphs are never seen in training.

Nuisances, drawn per image independently of the class (so none is a class
cue): rotation +-20 deg, scale 0.8-1.1, aspect +-12%, shear +-0.2, shift
+-15% of the half-width; an elastic wobble (smooth random displacement field,
plus a small shift of each stroke); pen width ~2-4 px; foreground and
background colours uniform in RGB, of either polarity (minimum luminance
contrast 0.3); background shading and smooth blotches; 0-4 faint thin clutter
strokes or specks; brightness/contrast jitter; occasional blur; pixel noise;
JPEG artefacts.

Determinism. Every class and every image has its own random stream derived
from (seed, class id[, image index]), so the same flags give byte-identical
files (with the same numpy and Pillow versions), and any class can be
regenerated alone.

Measured difficulty (default dataset, seed 0; 200 test episodes, 5-way
5-shot, 10 queries per class, images resized to 48x48 as the model reads
them; mean +- 95% CI; chance 20%):

| features                                   | 1-NN         | nearest mean |
|--------------------------------------------|--------------|--------------|
| raw pixels (`pixel_nn_accuracy`)           | 21.8 +- 0.8% | 19.1 +- 0.8% |
| grey pixels, per-image abs z-score         | 51.4 +- 1.2% | 59.9 +- 1.2% |
| HOG shape features (`hog_features`)        | 85.4 +- 1.0% | 89.0 +- 0.9% |
| small CNN trained on the 64 train classes  | 92.0 +- 0.7% | 90.7 +- 0.8% |

Raw pixels are at chance (colour and position dominate pixel distances);
hand-normalised pixels (`normalize=True`: grey, z-scored, absolute value,
which removes colour and polarity) reach about half; a hand-made
shift-tolerant shape feature reaches 85-89%, so the class information is in
the shape. The CNN row (4 conv blocks, 32-96 channels, softmax over the train
classes for 8 epochs, then nearest neighbour on its pooled features) was a
one-off check outside this module; it shows the problem is learnable.
`ctx-make-demo-data ... --baselines` prints the first three rows.
"""

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

from meta_dataset_pipeline import cli
from meta_dataset_pipeline import records_writer

# Strokes are drawn on a canvas this many times larger than the image and
# box-filtered down, which antialiases them (PIL draws aliased lines).
_SUPERSAMPLE = 4
# Larger bounding-box side of a class glyph in normalised units (the image
# spans [-1, 1]); each instance rescales it by a further 0.8-1.1.
_GLYPH_EXTENT = 1.35
# Points sampled along each curve before warping: smooth at 64 px.
_POINTS_PER_STROKE = 24
# Record files the generator writes; `--overwrite` only replaces a folder
# holding nothing else, so it cannot delete unrelated files.
_DATASET_FILE_RE = re.compile(r"^(\d+\.tfrecords|dataset_spec\.json)$")

_SPLITS = records_writer.SPLITS


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """What to generate.

  Attributes:
    num_classes: total number of classes (train + valid + test).
    num_valid_classes: validation classes; None for 16% of `num_classes`.
    num_test_classes: test classes; None for 20% of `num_classes`.
    images_per_class: images rendered for every class.
    image_size: side of the stored square images, in pixels.
    seed: master seed; the same seed gives byte-identical files.
    family_size: classes per family; the classes of a family share 1-2
      strokes (like letters of one alphabet), so episodes hold look-alike
      classes. 1 makes every class unrelated.
    image_format: "jpeg" (as the official records) or "png".
    jpeg_quality: JPEG quality; 75 is Pillow's default, which the official
      converters use.
  """
  num_classes: int = 100
  num_valid_classes: int | None = None
  num_test_classes: int | None = None
  images_per_class: int = 40
  image_size: int = 64
  seed: int = 0
  family_size: int = 4
  image_format: str = "jpeg"
  jpeg_quality: int = 75

  def split_sizes(self) -> dict[str, int]:
    """Returns the number of classes of each split (TRAIN, VALID, TEST).

    Raises:
      ValueError: if the split leaves a split without classes.
    """
    n = self.num_classes
    valid = (self.num_valid_classes if self.num_valid_classes is not None
             else max(1, round(0.16 * n)))
    test = (self.num_test_classes if self.num_test_classes is not None
            else max(1, round(0.2 * n)))
    train = n - valid - test
    if min(train, valid, test) < 1:
      raise ValueError(
          f"{n} classes cannot be split into train/valid/test with "
          f"{valid} valid and {test} test classes; every split needs >= 1")
    return {"TRAIN": train, "VALID": valid, "TEST": test}

  def validate(self):
    """Raises ValueError on settings the generator cannot honour."""
    self.split_sizes()
    if self.images_per_class < 1:
      raise ValueError(f"images_per_class must be >= 1, got "
                       f"{self.images_per_class}")
    if self.family_size < 1:
      raise ValueError(f"family_size must be >= 1, got {self.family_size}")
    if self.image_size < 16:
      raise ValueError(f"image_size must be >= 16, got {self.image_size}")
    if self.image_format not in ("jpeg", "png"):
      raise ValueError(f"image_format must be jpeg or png, got "
                       f"{self.image_format!r}")
    if not 1 <= self.jpeg_quality <= 95:
      raise ValueError(f"jpeg_quality must be in [1, 95], got "
                       f"{self.jpeg_quality}")


# ---------------------------------------------------------------------------
# Class programs: a glyph is a handful of strokes in normalised coordinates.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stroke:
  """One stroke of a glyph, in normalised coordinates (image = [-1, 1]^2).

  Attributes:
    points: (N, 2) polyline sampled along the stroke's curve.
    dot_radius: > 0 for a filled dot centred at `points[0]`, else 0.
  """
  points: np.ndarray
  dot_radius: float = 0.0


def _bezier(control: np.ndarray, n: int = _POINTS_PER_STROKE) -> np.ndarray:
  """Samples a Bezier curve (any degree) at `n` evenly spaced parameters."""
  t = np.linspace(0.0, 1.0, n)
  degree = len(control) - 1
  out = np.zeros((n, 2))
  for i, c in enumerate(control):
    out += (math.comb(degree, i) * t**i * (1 - t)**(degree - i))[:, None] * c
  return out


def _unit(angle: float) -> np.ndarray:
  return np.array([math.cos(angle), math.sin(angle)])


def _random_curve(rng: np.random.Generator, start: np.ndarray,
                  length: float) -> np.ndarray:
  """One random curve starting at `start`, roughly `length` long.

  Args:
    rng: the random generator (consumed).
    start: (2,) start point.
    length: typical size of the curve in normalised units.

  Returns:
    (N, 2) points along the curve.
  """
  kind = rng.choice(["line", "quad", "cubic", "arc", "zigzag"],
                    p=[0.2, 0.25, 0.2, 0.2, 0.15])
  direction = rng.uniform(0, 2 * math.pi)
  end = start + length * _unit(direction)
  if kind == "line":
    return _bezier(np.stack([start, end]))
  if kind == "quad":
    normal = _unit(direction + math.pi / 2)
    bend = rng.uniform(-0.8, 0.8) * length
    return _bezier(np.stack([start, (start + end) / 2 + bend * normal, end]))
  if kind == "cubic":
    c1 = start + rng.uniform(-0.8, 0.8, 2) * length
    c2 = end + rng.uniform(-0.8, 0.8, 2) * length
    return _bezier(np.stack([start, c1, c2, end]))
  if kind == "arc":
    radius = length * rng.uniform(0.3, 0.55)
    sweep = rng.uniform(0.5, 1.8) * math.pi * rng.choice([-1.0, 1.0])
    centre = start - radius * _unit(direction)
    angles = direction + np.linspace(0.0, sweep, _POINTS_PER_STROKE)
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], -1)
  # Zigzag: sharp corners, which smooth curves never produce.
  points = [start]
  heading = direction
  for _ in range(rng.integers(2, 4)):
    points.append(points[-1] + length * rng.uniform(0.4, 0.7) *
                  _unit(heading))
    heading += rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 0.85) * math.pi
  points = np.stack(points)
  # Resample each segment so the elastic warp bends straight parts too.
  t = np.linspace(0.0, 1.0, 8)[:, None]
  return np.concatenate(
      [a + t * (b - a) for a, b in zip(points[:-1], points[1:])])


def _random_strokes(rng: np.random.Generator, count: int,
                    existing: Sequence[np.ndarray] = (),
                    length: tuple[float, float] = (0.7, 1.4),
                    p_attached: float = 0.65) -> list[np.ndarray]:
  """`count` random curves; most start on an earlier (or existing) curve.

  Starting on an earlier stroke, as in handwriting, keeps glyphs mostly
  connected.

  Args:
    rng: the random generator (consumed).
    count: number of curves to draw.
    existing: curves already in the glyph, which new ones may start on.
    length: range of the curves' size, normalised units.
    p_attached: probability that a curve starts on an earlier one.

  Returns:
    The new curves only.
  """
  curves = list(existing)
  for _ in range(count):
    if curves and rng.random() < p_attached:
      prev = curves[rng.integers(len(curves))]
      start = prev[rng.integers(len(prev))]
    else:
      start = rng.uniform(-0.6, 0.6, 2)
    curves.append(_random_curve(rng, start, rng.uniform(*length)))
  return curves[len(existing):]


def make_family(rng: np.random.Generator) -> list[np.ndarray]:
  """Draws the 1-2 strokes that all classes of a family share."""
  return _random_strokes(rng, rng.choice([1, 2], p=[0.3, 0.7]))


def make_glyph(rng: np.random.Generator,
               shared: Sequence[np.ndarray] = ()) -> list[Stroke]:
  """Draws one class: a random "character" made of 2-4 strokes.

  Args:
    rng: the class's random generator (consumed).
    shared: strokes of the class's family (from `make_family`), which the
      glyph contains; the class adds 1-2 strokes of its own. Empty for an
      unrelated glyph of 2-4 strokes.

  Returns:
    The strokes of the glyph, centred and scaled to `_GLYPH_EXTENT`, plus
    sometimes a diacritic-like dot.
  """
  while True:
    if shared:
      # Shorter strokes, mostly attached to the shared ones: siblings keep
      # the family's overall layout and differ in a part.
      own = _random_strokes(rng, rng.choice([1, 2], p=[0.6, 0.4]), shared,
                            length=(0.5, 1.1), p_attached=0.8)
    else:
      own = _random_strokes(rng, rng.choice([2, 3, 4], p=[0.3, 0.45, 0.25]))
    curves = list(shared) + own
    points = np.concatenate(curves)
    lo, hi = points.min(0), points.max(0)
    extent = hi - lo
    # Reject near-1D glyphs (a lone bar): after normalisation they would
    # differ from each other mostly by orientation, which instances jitter.
    if extent.min() >= 0.35 * extent.max():
      break
  scale = _GLYPH_EXTENT / extent.max()
  centre = (lo + hi) / 2
  strokes = [Stroke((c - centre) * scale) for c in curves]
  if rng.random() < 0.3:
    anchor = strokes[rng.integers(len(strokes))].points
    anchor = anchor[rng.integers(len(anchor))]
    offset = rng.uniform(0.25, 0.4) * _unit(rng.uniform(0, 2 * math.pi))
    dot = np.clip(anchor + offset, -_GLYPH_EXTENT / 2, _GLYPH_EXTENT / 2)
    strokes.append(Stroke(dot[None], dot_radius=rng.uniform(0.08, 0.12)))
  return strokes


# ---------------------------------------------------------------------------
# Instances: random geometry, stroke width, colours, clutter and noise.
# ---------------------------------------------------------------------------


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


def _render_mask(strokes: Sequence[Stroke], widths: Sequence[float],
                 size: int) -> np.ndarray:
  """Rasterises strokes into an antialiased (size, size) mask in [0, 1].

  Args:
    strokes: strokes in normalised coordinates (already transformed).
    widths: stroke width of each stroke, normalised units.
    size: output side in pixels.

  Returns:
    float32 coverage mask.
  """
  canvas = size * _SUPERSAMPLE
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


def _transform_glyph(strokes: Sequence[Stroke],
                     rng: np.random.Generator) -> tuple[list[Stroke], float]:
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
    out.append(Stroke(p @ affine.T + shift, stroke.dot_radius * scale))
  return out, scale


def _clutter(rng: np.random.Generator) -> tuple[list[Stroke], list[float]]:
  """Random short thin strokes and specks anywhere in the image.

  They are not part of any class, so a model must learn to ignore them; they
  are thinner and fainter than glyph strokes so a human can still tell the
  glyph apart.
  """
  strokes, widths = [], []
  for _ in range(rng.integers(0, 5)):
    start = rng.uniform(-1, 1, 2)
    if rng.random() < 0.3:
      strokes.append(Stroke(start[None], rng.uniform(0.02, 0.05)))
    else:
      strokes.append(Stroke(_random_curve(rng, start,
                                          rng.uniform(0.15, 0.45))))
    widths.append(rng.uniform(0.025, 0.06))
  return strokes, widths


def render_instance(glyph: Sequence[Stroke], rng: np.random.Generator,
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
  shade_dir = _unit(rng.uniform(0, 2 * math.pi))
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


# ---------------------------------------------------------------------------
# Deterministic generation.
# ---------------------------------------------------------------------------


def _rng(seed: int, *key: int) -> np.random.Generator:
  # Independent streams keyed by (kind, ids): 0 = class, 1 = instance,
  # 2 = family. Any class can be regenerated alone, in any order, with the
  # same result.
  return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def family_start(config: DemoConfig, class_id: int) -> int:
  """Returns the first class id of `class_id`'s family.

  Families are runs of `config.family_size` consecutive ids inside one split
  (the last run of a split may be shorter), so a family never straddles two
  splits and test families are unseen in training.
  """
  first = 0
  for size in config.split_sizes().values():
    if class_id < first + size:
      return first + (class_id - first) // config.family_size * (
          config.family_size)
    first += size
  raise ValueError(f"class id {class_id} >= {config.num_classes}")


def class_glyph(config: DemoConfig, class_id: int) -> list[Stroke]:
  """Returns the glyph of class `class_id`."""
  shared = ()
  if config.family_size > 1:
    shared = make_family(_rng(config.seed, 2,
                              family_start(config, class_id)))
  return make_glyph(_rng(config.seed, 0, class_id), shared)


def render_class(config: DemoConfig, class_id: int,
                 num_images: int | None = None) -> list[np.ndarray]:
  """Renders the images of one class (uint8 RGB arrays).

  Args:
    config: the dataset config.
    class_id: absolute class id.
    num_images: how many; None for `config.images_per_class`.

  Returns:
    The images; image i is the same whatever `num_images` is.
  """
  glyph = class_glyph(config, class_id)
  n = config.images_per_class if num_images is None else num_images
  return [render_instance(glyph, _rng(config.seed, 1, class_id, i),
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


def class_name(class_id: int) -> str:
  return f"glyph_{class_id:04d}"


class OutputDirError(cli.UserError):
  """The output folder cannot be used; the message names it."""


def _check_output_dir(output_dir: str, overwrite: bool):
  """Fails early, before any work, if `output_dir` cannot be (re)written.

  Args:
    output_dir: the folder the dataset goes to.
    overwrite: whether an existing generated dataset may be replaced.

  Raises:
    OutputDirError: with a message naming the path.
  """
  if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
    raise OutputDirError(f"{output_dir} exists and is not a directory")
  if os.path.isdir(output_dir):
    entries = sorted(os.listdir(output_dir))
    if entries and not overwrite:
      raise OutputDirError(
          f"{output_dir} exists and is not empty ({len(entries)} entries); "
          "pass --overwrite to replace a dataset written by this tool")
    foreign = [e for e in entries if not _DATASET_FILE_RE.match(e)]
    if foreign:
      raise OutputDirError(
          f"{output_dir} holds files this tool does not write (e.g. "
          f"{foreign[0]!r}); refusing to delete it even with --overwrite")
    if not os.access(output_dir, os.W_OK | os.X_OK):
      raise OutputDirError(f"{output_dir} is not writable")
  parent = os.path.dirname(os.path.abspath(output_dir))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise OutputDirError(
        f"cannot create the parent folder of {output_dir}: {e}") from e
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputDirError(
        f"cannot write {output_dir}: its parent folder {parent} is not "
        "writable")


def _move_into_place(staging: str, output_dir: str):
  """Renames the finished `staging` folder to `output_dir`.

  An existing `output_dir` (already checked) is moved aside first and
  deleted only once the new dataset is in place, so a failure at any point
  leaves either the old or the new dataset complete.
  """
  if not os.path.isdir(output_dir):
    os.rename(staging, output_dir)
    return
  if not os.listdir(output_dir):
    os.rmdir(output_dir)
    os.rename(staging, output_dir)
    return
  parent, base = os.path.split(os.path.abspath(output_dir))
  old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex}")
  os.rename(output_dir, old)
  try:
    os.rename(staging, output_dir)
  except BaseException:
    os.rename(old, output_dir)
    raise
  shutil.rmtree(old)


def generate_dataset(output_dir: str, config: DemoConfig = DemoConfig(),
                     name: str | None = None, overwrite: bool = False,
                     log: Callable[[str], None] | None = None) -> dict:
  """Writes the demo dataset in the official Meta-Dataset record format.

  Everything is written to a hidden staging folder beside `output_dir` and
  renamed into place at the end, so an interrupted run leaves no partial
  dataset and does not touch an existing one.

  Args:
    output_dir: the dataset folder to create (`<records_root>/<name>`).
    config: what to generate.
    name: the dataset name in the spec; None for `output_dir`'s basename (the
      source name that the episode pipeline uses for `<root>/<name>`).
    overwrite: replace an existing dataset folder written by this tool.
    log: called with progress lines; None for silence.

  Returns:
    The dataset spec dict that was written.

  Raises:
    OutputDirError: if `output_dir` cannot be used (message names it).
    ValueError: on an invalid config.
  """
  config.validate()
  output_dir = output_dir.rstrip(os.sep) or os.sep
  name = name or os.path.basename(os.path.abspath(output_dir))
  _check_output_dir(output_dir, overwrite)
  parent, base = os.path.split(os.path.abspath(output_dir))
  staging = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
  try:
    # Plain mkdir (not mkdtemp, which is 0700) so the folder gets the
    # caller's umask like any other new folder.
    os.mkdir(staging)
  except OSError as e:
    raise OutputDirError(f"cannot write next to {output_dir}: {e}") from e
  try:
    start = time.time()
    counts = []
    for class_id in range(config.num_classes):
      images = render_class(config, class_id)
      counts.append(records_writer.write_class_records(
          staging, class_id,
          (encode_image(im, config.image_format, config.jpeg_quality)
           for im in images)))
      if log and ((class_id + 1) % 10 == 0 or
                  class_id + 1 == config.num_classes):
        log(f"  {class_id + 1}/{config.num_classes} classes "
            f"({time.time() - start:.1f} s)")
    spec = records_writer.dataset_spec_dict(
        name=name,
        classes_per_split=config.split_sizes(),
        images_per_class=counts,
        class_names=[class_name(i) for i in range(config.num_classes)],
        path=output_dir)
    # The spec is written last: a folder without it is never complete.
    records_writer.write_dataset_spec(staging, spec)
    _move_into_place(staging, output_dir)
  except OSError as e:
    # E.g. a full disk: report it against the folder the user named.
    raise OutputDirError(f"writing {output_dir} failed: {e}") from e
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return spec


def render_preview(config: DemoConfig, path: str,
                   class_ids: Sequence[int] = tuple(range(8)),
                   num_instances: int = 10, zoom: int = 2):
  """Writes a PNG grid: one row per class, one column per instance.

  Args:
    config: the dataset config (seed, image size).
    path: the PNG file to write.
    class_ids: classes to show, one per row.
    num_instances: instances per row.
    zoom: integer upscaling factor, for legibility.
  """
  s, gap = config.image_size * zoom, 4
  grid = Image.new("RGB", (num_instances * (s + gap) + gap,
                           len(class_ids) * (s + gap) + gap), (255,) * 3)
  for row, class_id in enumerate(class_ids):
    for col, image in enumerate(render_class(config, class_id,
                                             num_instances)):
      tile = Image.fromarray(image).resize((s, s), Image.Resampling.NEAREST)
      grid.paste(tile, (gap + col * (s + gap), gap + row * (s + gap)))
  with records_writer.atomic_output_path(path) as tmp:
    grid.save(tmp, format="PNG")


# ---------------------------------------------------------------------------
# Baselines: how hard is the dataset for non-learned classifiers?
# ---------------------------------------------------------------------------


def load_split_images(records_dir: str, split: str = "TEST",
                      image_size: int = 48) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split's images as the official pipeline feeds them to a model.

  Decoding follows the official reader: `decode_image(channels=3)`, bilinear
  resize with `align_corners=True`, then scaling to [-1, 1].

  Args:
    records_dir: a dataset folder with `dataset_spec.json`.
    split: "TRAIN", "VALID" or "TEST".
    image_size: side the images are resized to.

  Returns:
    (images float32 [N, size, size, 3], labels int64 [N]).
  """
  # Imported here: only reading needs TensorFlow; the generator and
  # records_writer are numpy/PIL/pure Python.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  with open(os.path.join(records_dir, records_writer.DATASET_SPEC_FILENAME),
            encoding="utf-8") as f:
    spec = json.load(f)
  per_split = spec["classes_per_split"]
  first = sum(per_split[s] for s in _SPLITS[:_SPLITS.index(split)])
  features = {"image": tf.io.FixedLenFeature([], tf.string),
              "label": tf.io.FixedLenFeature([], tf.int64)}

  def decode(record):
    ex = tf.io.parse_single_example(record, features)
    img = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    img = tf.compat.v1.image.resize(
        tf.cast(img, tf.float32)[None], [image_size, image_size],
        method=tf.image.ResizeMethod.BILINEAR, align_corners=True)[0]
    return 2 * (img / 255.0 - 0.5), ex["label"]

  images, labels = [], []
  for class_id in range(first, first + per_split[split]):
    path = os.path.join(records_dir, spec["file_pattern"].format(class_id))
    for img, label in tf.data.TFRecordDataset(path).map(decode):
      images.append(img.numpy())
      labels.append(int(label))
  return np.stack(images), np.array(labels, np.int64)


def _episodes(labels: np.ndarray, num_episodes: int, ways: int, shots: int,
              queries: int, seed: int) -> Iterator[tuple[np.ndarray, ...]]:
  """Yields (support indices [ways*shots], query indices [ways*queries])."""
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = {c: np.flatnonzero(labels == c) for c in classes}
  if len(classes) < ways:
    raise ValueError(f"{len(classes)} classes < {ways} ways")
  if min(len(v) for v in by_class.values()) < shots + queries:
    raise ValueError(f"a class has fewer than {shots + queries} images")
  for _ in range(num_episodes):
    chosen = rng.choice(classes, ways, replace=False)
    picks = [rng.choice(by_class[c], shots + queries, replace=False)
             for c in chosen]
    yield (np.concatenate([p[:shots] for p in picks]),
           np.concatenate([p[shots:] for p in picks]))


def _mean_ci(accuracies: Sequence[float]) -> tuple[float, float]:
  # 95% CI of the mean over episodes, as Meta-Dataset reports it.
  a = np.asarray(accuracies, np.float64)
  return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def episode_nn_accuracy(features: np.ndarray, labels: np.ndarray,
                        num_episodes: int = 200, ways: int = 5,
                        shots: int = 5, queries: int = 10,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
  """Few-shot accuracy of 1-NN and nearest class mean on fixed features.

  Args:
    features: [N, ...] one feature vector (or image) per example.
    labels: [N] class ids.
    num_episodes: episodes to average over.
    ways: classes per episode.
    shots: support images per class.
    queries: query images per class.
    seed: episode sampling seed.

  Returns:
    {"1nn": (mean, ci95), "ncm": (mean, ci95)}, Euclidean distances.
  """
  x = features.reshape(len(features), -1).astype(np.float64)
  nn_acc, ncm_acc = [], []
  for support, query in _episodes(labels, num_episodes, ways, shots, queries,
                                  seed):
    s, q = x[support], x[query]
    # Episode-local labels 0..ways-1 (support is grouped by class).
    s_y = np.repeat(np.arange(ways), shots)
    q_y = np.repeat(np.arange(ways), queries)
    d = ((q**2).sum(1)[:, None] - 2 * q @ s.T + (s**2).sum(1)[None])
    nn_acc.append(np.mean(s_y[d.argmin(1)] == q_y))
    means = s.reshape(ways, shots, -1).mean(1)
    d = ((q**2).sum(1)[:, None] - 2 * q @ means.T +
         (means**2).sum(1)[None])
    ncm_acc.append(np.mean(d.argmin(1) == q_y))
  return {"1nn": _mean_ci(nn_acc), "ncm": _mean_ci(ncm_acc)}


def normalize_pixels(images: np.ndarray) -> np.ndarray:
  """Grey levels, z-scored per image, absolute value: colour/polarity-free.

  Glyph strokes are the outliers of an image's grey-level distribution
  whatever their colour, so |z| maps them to high values on either polarity.
  """
  grey = images.mean(-1)
  z = (grey - grey.mean((1, 2), keepdims=True)) / (
      grey.std((1, 2), keepdims=True) + 1e-6)
  return np.abs(z)


def pixel_nn_accuracy(records_dir: str, split: str = "TEST",
                      num_episodes: int = 200, ways: int = 5, shots: int = 5,
                      queries: int = 10, image_size: int = 48,
                      seed: int = 0, *, normalize: bool = False
                      ) -> dict[str, tuple[float, float]]:
  """Raw-pixel 1-NN and nearest-class-mean accuracy on few-shot episodes.

  A lower bound that a learned model must clearly beat: if raw pixels sufficed
  the dataset would not exercise representation learning.

  Args:
    records_dir: a dataset folder with `dataset_spec.json`.
    split: "TRAIN", "VALID" or "TEST".
    num_episodes: episodes to average over.
    ways: classes per episode.
    shots: support images per class.
    queries: query images per class.
    image_size: side the images are resized to (as the model reads them).
    seed: episode sampling seed.
    normalize: compare `normalize_pixels` images instead of raw RGB.

  Returns:
    {"1nn": (mean, ci95), "ncm": (mean, ci95)}.
  """
  images, labels = load_split_images(records_dir, split, image_size)
  if normalize:
    images = normalize_pixels(images)
  return episode_nn_accuracy(images, labels, num_episodes, ways, shots,
                             queries, seed)


def hog_features(images: np.ndarray, cell: int = 6,
                 bins: int = 9) -> np.ndarray:
  """HOG-like gradient-orientation histograms (pure numpy).

  Invariant to colour and polarity (grey levels, unsigned orientations) and
  to local contrast (block normalisation), and tolerant to small shifts
  (cell pooling): a hand-made shape feature.

  Args:
    images: [N, H, W, C] images; H and W divisible by `cell`.
    cell: cell side in pixels.
    bins: orientation bins over [0, pi).

  Returns:
    [N, D] L2-normalised features.
  """
  gray = images.mean(-1)
  gy, gx = np.gradient(gray, axis=(1, 2))
  mag = np.hypot(gx, gy)
  pos = (np.arctan2(gy, gx) % math.pi) / math.pi * bins
  lo = np.floor(pos).astype(int) % bins
  frac = pos - np.floor(pos)
  n, h, w = gray.shape
  hist = np.zeros((n, h, w, bins), np.float32)
  # Linear vote between the two nearest orientation bins.
  np.put_along_axis(hist, lo[..., None], (mag * (1 - frac))[..., None], -1)
  hi = (lo + 1) % bins
  hist += np.eye(bins, dtype=np.float32)[hi] * (mag * frac)[..., None]
  hist = hist.reshape(n, h // cell, cell, w // cell, cell, bins).sum((2, 4))
  # 2x2-cell blocks, L2-Hys normalised.
  blocks = np.concatenate([hist[:, :-1, :-1], hist[:, 1:, :-1],
                           hist[:, :-1, 1:], hist[:, 1:, 1:]], -1)
  blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True) + 1e-6
  blocks = np.minimum(blocks, 0.2)
  blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True) + 1e-6
  feats = blocks.reshape(n, -1)
  return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-6)


def shape_feature_nn_accuracy(
    records_dir: str, split: str = "TEST", num_episodes: int = 200,
    ways: int = 5, shots: int = 5, queries: int = 10, image_size: int = 48,
    seed: int = 0) -> dict[str, tuple[float, float]]:
  """As `pixel_nn_accuracy`, on HOG-like shape features instead of pixels.

  Shows that the class information is in the glyph's shape: a hand-made
  colour- and contrast-invariant feature does far better than raw pixels.

  Args:
    records_dir: a dataset folder with `dataset_spec.json`.
    split: "TRAIN", "VALID" or "TEST".
    num_episodes: episodes to average over.
    ways: classes per episode.
    shots: support images per class.
    queries: query images per class.
    image_size: side the images are resized to.
    seed: episode sampling seed (same episodes as `pixel_nn_accuracy`).

  Returns:
    {"1nn": (mean, ci95), "ncm": (mean, ci95)}.
  """
  images, labels = load_split_images(records_dir, split, image_size)
  return episode_nn_accuracy(hog_features(images), labels, num_episodes,
                             ways, shots, queries, seed)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog="ctx-make-demo-data",
      description="Write the procedural-glyph demo dataset in the official "
      "Meta-Dataset record format (no download needed).")
  d = DemoConfig()
  parser.add_argument("--output_dir", required=True,
                      help="dataset folder to create, e.g. demo_data/glyphs "
                      "(<records_root>/<source name>)")
  parser.add_argument("--num_classes", type=int, default=d.num_classes,
                      help="glyph classes in all")
  parser.add_argument("--num_valid_classes", type=int, default=None,
                      help="default: 16%% of --num_classes")
  parser.add_argument("--num_test_classes", type=int, default=None,
                      help="default: 20%% of --num_classes")
  parser.add_argument("--images_per_class", type=int,
                      default=d.images_per_class, help="images per class")
  parser.add_argument("--image_size", type=int, default=d.image_size,
                      help="side of the stored images, pixels")
  parser.add_argument("--seed", type=int, default=d.seed,
                      help="the same flags give byte-identical files")
  parser.add_argument("--family_size", type=int, default=d.family_size,
                      help="classes per family of look-alike glyphs that "
                      "share strokes (1: all classes unrelated)")
  parser.add_argument("--image_format", choices=("jpeg", "png"),
                      default=d.image_format, help="encoding of the images")
  parser.add_argument("--name", default=None,
                      help="dataset name in the spec; default: the "
                      "basename of --output_dir")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing dataset folder written by "
                      "this tool")
  parser.add_argument("--preview", default=None, metavar="PNG",
                      help="also write a PNG grid of 8 classes x 10 "
                      "instances")
  parser.add_argument("--baselines", action="store_true",
                      help="afterwards, print raw-pixel and shape-feature "
                      "nearest-neighbour accuracies on 5-way 5-shot test "
                      "episodes")
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  """Command-line entry point; returns the exit status."""
  args = _parse_args(argv)
  return cli.guarded("ctx-make-demo-data", lambda: _main(args), args.verbose)


def _main(args) -> int:
  config = DemoConfig(
      num_classes=args.num_classes,
      num_valid_classes=args.num_valid_classes,
      num_test_classes=args.num_test_classes,
      images_per_class=args.images_per_class, image_size=args.image_size,
      seed=args.seed, family_size=args.family_size,
      image_format=args.image_format)
  config.validate()
  start = time.time()
  print(f"Writing {config.num_classes} classes x {config.images_per_class} "
        f"images ({config.split_sizes()}) to {args.output_dir}", flush=True)
  spec = generate_dataset(args.output_dir, config, name=args.name,
                          overwrite=args.overwrite,
                          log=lambda s: print(s, flush=True))
  size = sum(os.path.getsize(os.path.join(args.output_dir, f))
             for f in os.listdir(args.output_dir))
  print(f"Done in {time.time() - start:.1f} s: {size / 1e6:.1f} MB, dataset "
        f"name {spec['name']!r}, classes per split "
        f"{spec['classes_per_split']}", flush=True)
  if args.preview:
    render_preview(config, args.preview)
    print(f"Preview: {args.preview}")
  if args.baselines:
    for label, fn in (
        ("raw pixels", pixel_nn_accuracy),
        ("grey |z-score| pixels",
         lambda d: pixel_nn_accuracy(d, normalize=True)),
        ("HOG shape features", shape_feature_nn_accuracy)):
      acc = fn(args.output_dir)
      print(f"5-way 5-shot test, {label}: "
            f"1-NN {100 * acc['1nn'][0]:.1f} +- {100 * acc['1nn'][1]:.1f}%, "
            f"nearest mean {100 * acc['ncm'][0]:.1f} +- "
            f"{100 * acc['ncm'][1]:.1f}%", flush=True)
  return 0


def run():
  """Console script `ctx-make-demo-data`: parses `sys.argv`."""
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  run()
