r"""Embedded demo dataset: procedurally rendered glyphs, nothing to download.

This module draws the images; `dataset.py` (`ctx-make-demo-data`) writes them
as a few-shot dataset in the official Meta-Dataset record format that CTX can
train and be evaluated on with a 2-core CPU.
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

Measured difficulty (default dataset, seed 0; the first 200 of the demo's
5-way 5-shot test episodes, 10 queries per class, images at 48x48 as the
model reads them, through the episode pipeline; mean +- 95% CI; chance 20%;
`ctx-make-demo-data ... --baselines`, `ctx_jax.eval.baselines`):

| features                                   | 1-NN         | nearest mean |
|--------------------------------------------|--------------|--------------|
| raw pixels                                 | 22.5 +- 0.8% | 20.6 +- 0.8% |
| grey pixels, per-image abs z-score         | 51.3 +- 1.1% | 61.0 +- 1.1% |
| HOG shape features                         | 85.3 +- 1.0% | 89.1 +- 0.9% |
| small CNN trained on the 64 train classes  | 92.0 +- 0.7% | 90.7 +- 0.8% |

Raw pixels are at chance (colour and position dominate pixel distances);
hand-normalised pixels (`grey_abs_zscore`: grey, z-scored, absolute
value, which removes colour and polarity) reach about half; a hand-made
shift-tolerant shape feature reaches 85-89%, so the class information is in
the shape. The CNN row (4 conv blocks, 32-96 channels, softmax over the train
classes for 8 epochs, then nearest neighbour on its pooled features) was a
one-off check (first release, its own episodes); it shows the problem is
learnable.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import records_writer

# Strokes are drawn on a canvas this many times larger than the image and
# box-filtered down, which antialiases them (PIL draws aliased lines).
_SUPERSAMPLE = 4
# Larger bounding-box side of a class glyph in normalised units (the image
# spans [-1, 1]); each instance rescales it by a further 0.8-1.1.
_GLYPH_EXTENT = 1.35
# Points sampled along each curve before warping: smooth at 64 px.
_POINTS_PER_STROKE = 24
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


def class_name(class_id: int) -> str:
  return f"glyph_{class_id:04d}"
