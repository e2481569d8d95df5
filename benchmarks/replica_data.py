"""Writes a full-structure replica of a large source, with tiny images.

    python benchmarks/replica_data.py --output_dir /tmp/ilsvrc_1pct \
        [--fraction 0.01] [--spec SPEC_JSON] [--image_size 32] [--workers 2]
        [--natural 500x375x16]

The replica has the class structure of an official dataset spec (by default
ILSVRC-2012: 1000 classes in the train/valid/test DAGs of WordNet ids,
about 1.28 M records) with every class's image count scaled by `--fraction`
(at least 1 record per class), so that `load_dataset_spec` and the episode
pipeline (DAG sampling included) treat it as the real source. Every record
holds the same small JPEG (`--image_size` pixels square, a few hundred
bytes), written with the project's record writer (`records_writer`), so a
100% replica takes about 1 GB and a few minutes on 2 cores. Used by
`startup_bench.py` to measure start-up cost against the number of records.

`--natural 500x375x16` instead cycles 16 distinct JPEGs of ILSVRC's typical
size and compressed size (1/f noise, quality 90, about 125 KB), for
throughput measurements where reading and decoding cost matter.

Flat and bi-level specs are scaled too (`--spec`, e.g. QuickDraw's).
"""

import argparse
import concurrent.futures
import io
import json
import os
import pathlib
import sys
import time

# This checkout's packages, not an installed copy's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np
from PIL import Image

from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import records_writer

REPO = pathlib.Path(__file__).resolve().parents[1]
SPECS = REPO.parent / "shared" / "fixtures" / "official_specs" / "dataset_specs"
DEFAULT_SPEC = SPECS / "ilsvrc_2012_dataset_spec.json"


def tiny_jpeg(size: int) -> bytes:
  """A smooth colour gradient, JPEG quality 90 (a few hundred bytes)."""
  y, x = np.mgrid[0:size, 0:size]
  rgb = np.stack([x * 255 // size, y * 255 // size,
                  (x + y) * 127 // size], axis=-1).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, format="JPEG", quality=90)
  return out.getvalue()


def natural_jpeg(width: int, height: int, seed: int,
                 quality: int = 90) -> bytes:
  """Noise with a natural image's 1/f amplitude spectrum, in colour.

  At 500x375 and quality 90 about 125 KB, as ILSVRC's photos (about 110 KB
  on average), and as slow to decode as a photo of that size.
  """
  rng = np.random.default_rng(seed)
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  f = np.sqrt(fx**2 + fy**2)
  f[0, 0] = 1.0
  channels = []
  for amplitude in (1.0, 0.35, 0.35):  # Luma, then two weaker chroma.
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
    x = np.fft.irfft2(spectrum, s=(height, width))
    channels.append((x - x.mean()) / x.std() * amplitude)
  y, cb, cr = channels
  rgb = np.stack([y + 1.4 * cr, y - 0.34 * cb - 0.7 * cr, y + 1.77 * cb],
                 axis=-1) * 50 + 128
  out = io.BytesIO()
  Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(
      out, format="JPEG", quality=quality)
  return out.getvalue()


def scaled(count: int, fraction: float) -> int:
  return max(1, int(round(count * fraction)))


def scaled_spec(spec_path, fraction: float) -> tuple[dict, dict | None]:
  """(spec dict, num_leaf_images dict or None) with counts scaled."""
  dct = json.loads(pathlib.Path(spec_path).read_text())
  spec = spec_lib.load_dataset_spec(spec_path)
  leaf_counts = None
  if spec_lib.has_dag_ontology(spec):
    for split in spec_lib.Split:
      graph = spec.split_subgraphs[split]
      counts = dct["images_per_class"][split.name]
      leaves = {l: scaled(counts[l], fraction) for l in graph.leaves}
      for wn_id, spanned in graph.spanning_leaves.items():
        counts[wn_id] = sum(leaves[l] for l in spanned)
    leaf_counts = {spec.class_names[c]: n
                   for c, n in _class_counts(spec, fraction).items()}
  else:
    dct["images_per_class"] = {
        str(c): scaled(n, fraction)
        for c, n in sorted(spec.images_per_class.items())}
  return dct, leaf_counts


def _class_counts(spec, fraction: float) -> dict[int, int]:
  return {c: scaled(spec.get_total_images_per_class(c), fraction)
          for split in spec_lib.Split for c in spec.get_classes(split)}


def _write_class(output_dir: str, class_id: int, count: int,
                 images: list[bytes]) -> int:
  # Records of a class cycle through the images, starting at a class offset.
  return records_writer.write_class_records(
      output_dir, class_id,
      (images[(class_id + i) % len(images)] for i in range(count)))


def write_replica(output_dir, spec_path=DEFAULT_SPEC, fraction=0.01,
                  image_size=32, workers=2, natural=None) -> dict:
  """Writes the replica; returns a summary (records, bytes, seconds).

  `natural`: None for one tiny JPEG (`image_size`), else (width, height,
  count): `count` distinct `natural_jpeg`s of that size.
  """
  start = time.perf_counter()
  os.makedirs(output_dir, exist_ok=True)
  dct, leaf_counts = scaled_spec(spec_path, fraction)
  dct["path"] = str(output_dir)
  counts = _class_counts(spec_lib.load_dataset_spec(spec_path), fraction)
  if natural is None:
    images = [tiny_jpeg(image_size)]
  else:
    width, height, count = natural
    images = [natural_jpeg(width, height, seed) for seed in range(count)]
  if workers <= 1:  # In-process (e.g. under pytest, where JAX's threads
    # make forking unsafe).
    written = sum(_write_class(str(output_dir), c, n, images)
                  for c, n in counts.items())
  else:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
      futures = [pool.submit(_write_class, str(output_dir), c, n, images)
                 for c, n in counts.items()]
      written = sum(f.result() for f in futures)
  if leaf_counts is not None:
    with records_writer.atomic_output_path(
        os.path.join(output_dir, spec_lib.NUM_LEAF_IMAGES_FILENAME)) as tmp:
      pathlib.Path(tmp).write_text(json.dumps(leaf_counts, indent=2))
  records_writer.write_dataset_spec(str(output_dir), dct)
  spec = spec_lib.load_dataset_spec(output_dir)  # Checks the result.
  assert sum(counts.values()) == written == sum(
      spec.get_total_images_per_class(c) for c in counts)
  size = sum(e.stat().st_size for e in os.scandir(output_dir))
  return {"records": written, "classes": len(counts), "bytes": size,
          "image_bytes": int(np.mean([len(x) for x in images])),
          "fraction": fraction,
          "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--output_dir", required=True)
  p.add_argument("--fraction", type=float, default=0.01)
  p.add_argument("--spec", default=str(DEFAULT_SPEC))
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--natural", metavar="WxHxN",
                 help="N distinct natural-statistics JPEGs of WxH (e.g. "
                 "500x375x16) instead of one tiny image")
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args(argv)
  natural = None
  if args.natural:
    try:
      natural = tuple(int(v) for v in args.natural.split("x"))
      assert len(natural) == 3 and min(natural) > 0
    except (ValueError, AssertionError):
      p.error(f"--natural must be WxHxN, got {args.natural!r}")
  if not 0 < args.fraction <= 1:
    p.error(f"--fraction must be in (0, 1], got {args.fraction}")
  if not os.path.isfile(args.spec):
    p.error(f"--spec {args.spec}: no such file")
  print(json.dumps(write_replica(args.output_dir, args.spec, args.fraction,
                                 args.image_size, args.workers, natural)))


if __name__ == "__main__":
  sys.exit(main())
