"""The `md-convert` command: raw Meta-Dataset downloads to official records.

    md-convert --dataset dtd --data_root /raw/dtd --records_root /records \
        [--splits_root /records/splits] [--workers 8]
    md-convert --dataset dtd --records_root /records --verify

writes (or checks) `<records_root>/<dataset>/`: one `<class_id>.tfrecords`
per class and `dataset_spec.json`, as the official converter does. Split
files are read from `--splits_root` (`<dataset>_splits.json`) when present,
else drawn as the official converter draws them and written there. Bad
input stops with one line, `md-convert: error: ...`, and exit status 1.
"""

import argparse
import os
import sys

from meta_dataset_pipeline.conversion import common
from meta_dataset_pipeline.conversion import ilsvrc
from meta_dataset_pipeline.conversion import image_folders
from meta_dataset_pipeline.conversion import listed_images
from meta_dataset_pipeline.conversion import mscoco
from meta_dataset_pipeline.conversion import omniglot
from meta_dataset_pipeline.conversion import quickdraw
from meta_dataset_pipeline.conversion import runner
from meta_dataset_pipeline.conversion import verify

# Source name -> function(data_root, splits_root) -> Plan.
PLANNERS = {
    "ilsvrc_2012": ilsvrc.plan,
    "ilsvrc_2012_v2": ilsvrc.plan_v2,
    "omniglot": omniglot.plan,
    "aircraft": listed_images.plan_aircraft,
    "cu_birds": image_folders.plan_cu_birds,
    "dtd": image_folders.plan_dtd,
    "quickdraw": quickdraw.plan,
    "fungi": listed_images.plan_fungi,
    "vgg_flower": listed_images.plan_vgg_flower,
    "traffic_sign": image_folders.plan_traffic_sign,
    "mscoco": mscoco.plan,
}


class _Parser(argparse.ArgumentParser):
  """Usage errors as every other bad input: one line, exit status 1."""

  def error(self, message):
    raise common.ConversionError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="md-convert",
      description="Convert a raw Meta-Dataset download into the official "
      "record format (or --verify converted records).")
  p.add_argument("--dataset", required=True,
                 choices=sorted(PLANNERS))
  p.add_argument("--data_root", help="the raw download of the dataset")
  p.add_argument("--records_root", required=True,
                 help="records go to <records_root>/<dataset>/")
  p.add_argument("--splits_root",
                 help="folder of <dataset>_splits.json files (read if "
                 "present, else written); default <records_root>/splits")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="processes writing (or verifying) class files "
                 "(default: all CPUs)")
  p.add_argument("--verify", action="store_true",
                 help="check <records_root>/<dataset> against its spec "
                 "instead of converting")
  p.add_argument("--quiet", action="store_true", help="no progress line")
  return p


def main(argv=None) -> int:
  """Runs md-convert; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  records_dir = os.path.join(args.records_root, args.dataset)
  if args.verify:
    if not os.path.isdir(records_dir):
      raise common.ConversionError(
          f"expected a records folder at {records_dir} (no such folder)")
    problems = verify.verify(records_dir, workers=args.workers)
    for problem in problems:
      print(problem)
    print(f"md-convert --verify {records_dir}: "
          + (f"{len(problems)} problem(s)" if problems else "OK"))
    return 1 if problems else 0
  if not args.data_root:
    parser.error("--data_root is required to convert")
  if args.workers < 1:
    parser.error("--workers must be >= 1")
  common.require_dir(args.data_root, f"the raw {args.dataset} download "
                     "(--data_root)")
  splits_root = args.splits_root or os.path.join(args.records_root, "splits")
  plan = PLANNERS[args.dataset](args.data_root, splits_root)
  counts = runner.convert(plan, records_dir, workers=args.workers,
                          stream=None if args.quiet else sys.stderr)
  print(f"md-convert: wrote {len(counts)} classes, "
        f"{sum(counts.values())} images to {records_dir}")
  return 0


def run():
  """Console-script entry point."""
  try:
    sys.exit(main())
  except common.ConversionError as e:
    sys.exit(f"md-convert: error: {e}")
  except OSError as e:
    # Unwritable output, a full disk: one line, no traceback.
    sys.exit(f"md-convert: error: {e}")
  except KeyboardInterrupt:
    sys.exit("md-convert: interrupted; rerun the same command to resume")


if __name__ == "__main__":
  run()
