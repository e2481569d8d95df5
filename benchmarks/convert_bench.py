"""Images/s of md-convert against the official converter, same raw data.

Writes a synthetic raw download in GTSRB's layout (the traffic_sign source:
PPM images, so every image is decoded and re-encoded as JPEG, the
expensive case) with a split file naming its classes, then converts it

- with md-convert in this process, for each `--workers` count;
- with the official converter (`--official_src`, a checkout of
  google-research/meta-dataset, run by `--official_python`, a Python with
  its dependencies, e.g. TF 2.21), if given; only the conversion itself is
  timed, not TensorFlow's import.

Each converter's records are compared (same image bytes per class) before a
time is reported. Default (about a minute on 2 CPU cores):

  python benchmarks/convert_bench.py --official_src /tmp/official_src \
      --official_python /tmp/offvenv/bin/python

Writes a table to stdout and JSON to --output.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from meta_dataset_pipeline.conversion import image_folders
from meta_dataset_pipeline.conversion import records
from meta_dataset_pipeline.conversion import runner

_OFFICIAL_DRIVER = """
import sys, time
from absl import flags
from meta_dataset.dataset_conversion import dataset_to_records as d
records_root, splits_root, data_root = sys.argv[1:4]
flags.FLAGS(["x", "--records_root=" + records_root,
             "--splits_root=" + splits_root])
start = time.perf_counter()
d.TrafficSignConverter(name="traffic_sign", data_root=data_root
                       ).convert_dataset()
print(time.perf_counter() - start)
"""


def write_raw(root, num_classes, per_class, size, seed=0):
  """GTSRB-style raw data and a split file naming its classes."""
  rng = np.random.default_rng(seed)
  for k in range(num_classes):
    folder = os.path.join(root, "raw", "Final_Training", "Images", f"{k:05d}")
    os.makedirs(folder)
    for i in range(per_class):
      y, x = np.mgrid[0:size, 0:size]
      img = (rng.uniform(0, 255, 3) + (x + y)[..., None] * rng.uniform(
          -2, 2, 3) + rng.normal(0, 10, (size, size, 3)))
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
          os.path.join(folder, f"00000_{i:05d}.ppm"))
  os.makedirs(os.path.join(root, "splits"))
  with open(os.path.join(root, "splits", "traffic_sign_splits.json"),
            "w") as f:
    json.dump({"train": [], "valid": [],
               "test": [f"{k:02d}.class{k}" for k in range(num_classes)]}, f)


def _images(folder, num_classes):
  return [[records.parse_example(r)["image"][0] for r in
           records.iter_records(os.path.join(folder, f"{k}.tfrecords"))]
          for k in range(num_classes)]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_classes", type=int, default=8)
  p.add_argument("--per_class", type=int, default=250)
  p.add_argument("--size", type=int, default=64, help="image side, pixels")
  p.add_argument("--workers", default="1,2")
  p.add_argument("--official_src")
  p.add_argument("--official_python")
  p.add_argument("--output", default="benchmarks/convert_bench.json")
  args = p.parse_args()
  num_images = args.num_classes * args.per_class
  tmp = tempfile.mkdtemp()
  results = []
  try:
    write_raw(tmp, args.num_classes, args.per_class, args.size)
    reference = None
    for workers in [int(w) for w in args.workers.split(",")]:
      out = os.path.join(tmp, f"ours{workers}")
      plan = image_folders.plan_traffic_sign(os.path.join(tmp, "raw"),
                                             os.path.join(tmp, "splits"))
      start = time.perf_counter()
      runner.convert(plan, out, workers=workers, stream=None)
      seconds = time.perf_counter() - start
      images = _images(out, args.num_classes)
      assert reference is None or images == reference
      reference = images
      results.append({"converter": f"md-convert --workers {workers}",
                      "seconds": seconds, "images_per_s": num_images / seconds})
    if args.official_src:
      out = os.path.join(tmp, "official")
      proc = subprocess.run(
          [args.official_python, "-c", _OFFICIAL_DRIVER, out,
           os.path.join(tmp, "splits"), os.path.join(tmp, "raw")],
          env=dict(os.environ, PYTHONPATH=args.official_src,
                   TF_CPP_MIN_LOG_LEVEL="2"),
          capture_output=True, text=True, check=True)
      seconds = float(proc.stdout.split()[-1])
      assert _images(os.path.join(out, "traffic_sign"),
                     args.num_classes) == reference
      results.append({"converter": "official (one process)",
                      "seconds": seconds, "images_per_s": num_images / seconds})
  finally:
    shutil.rmtree(tmp)
  print(f"{num_images} PPM images {args.size}x{args.size} -> JPEG, "
        f"{args.num_classes} classes, {os.cpu_count()} CPUs")
  print(f"{'converter':28s} {'seconds':>8s} {'images/s':>9s}")
  for r in results:
    print(f"{r['converter']:28s} {r['seconds']:8.2f} {r['images_per_s']:9.0f}")
  with open(args.output, "w") as f:
    json.dump({"machine": platform.platform(), "cpus": os.cpu_count(),
               "num_images": num_images, "image_size": args.size,
               "results": results}, f, indent=2)


if __name__ == "__main__":
  sys.exit(main())
