"""`md-episode-grid`: a PNG of one episode, as an MD and as a SimCLR episode.

    md-episode-grid PATH --output grid.png [--split TRAIN --seed 0
        --image_size 84 --num_ways 5 --num_support 2 --num_query 2
        --max_images 16 --color_jitter_strength 1.0 --md_augmentation none]

PATH is a records folder. The same sampled episode is drawn twice: first as
the ordinary Meta-Dataset episode (with `--md_augmentation`, e.g. `bohb`),
then converted into a SimCLR episode (`simclr.py`) as training with
`simclr_episode_fraction` > 0 would see it. Four rows: MD support, MD query,
SimCLR support, SimCLR query; each image is titled with its label (for
SimCLR episodes, the support index it must be matched to). Rows longer than
`--max_images` are cut.
"""

import argparse
import dataclasses
import itertools
import sys
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import cli
from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import pipeline
from meta_dataset_pipeline import sampling
from meta_dataset_pipeline import simclr


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="md-episode-grid", description=__doc__.strip())
  parser.add_argument("path", help="records folder (with dataset_spec.json)")
  parser.add_argument("--output", required=True, help="PNG file to write")
  parser.add_argument("--split", default="TRAIN", type=str.upper,
                      choices=[s.name for s in spec_lib.Split],
                      help="split whose classes are sampled")
  parser.add_argument("--seed", type=int, default=0,
                      help="episode stream seed (as the pipeline's)")
  parser.add_argument("--episode", type=int, default=0,
                      help="which episode of the seeded stream to draw")
  parser.add_argument("--image_size", type=int, default=84,
                      help="image side, pixels")
  parser.add_argument("--num_ways", type=int, default=5,
                      help="0: variable (official sampler)")
  parser.add_argument("--num_support", type=int, default=2,
                      help="0: variable")
  parser.add_argument("--num_query", type=int, default=2, help="0: variable")
  parser.add_argument("--max_images", type=int, default=16,
                      help="images drawn per row (longer rows are cut)")
  parser.add_argument("--color_jitter_strength", type=float, default=1.0,
                      help="SimCLR colour jitter strength")
  parser.add_argument("--md_augmentation", default="none",
                      choices=simclr.MD_AUGMENTATIONS,
                      help="augmentation of the ordinary (MD) episode")
  return parser


def _episode(spec, split, cfg, args, fraction, md):
  """Episode `args.episode` of the stream with `fraction` converted."""
  cfg = dataclasses.replace(cfg, simclr_episode_fraction=fraction)
  aug = dataclasses.replace(simclr.SIMCLR_AUGMENTATION,
                            color_jitter_strength=args.color_jitter_strength)
  ds = pipeline.make_one_source_episode_dataset(
      spec, split, cfg, args.image_size, seed=args.seed,
      simclr_augmentation=aug, md_augmentation=md)
  it = ds.as_numpy_iterator()
  episode = next(itertools.islice(it, args.episode, None))
  del it  # TF 2.21: do not keep generator-backed iterators alive.
  return episode


def draw(path: str, md_episode, simclr_episode, title: str,
         max_images: int = 16) -> None:
  """Writes the four-row grid of two episodes to `path` (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = []
  for name, ep in (("MD", md_episode), ("SimCLR", simclr_episode)):
    for part in ("support", "query"):
      mask = ep[f"{part}_mask"]
      rows.append((f"{name} {part}\n({int(ep['num_ways'])} ways)",
                   ep[f"{part}_images"][mask][:max_images],
                   ep[f"{part}_labels"][mask][:max_images]))
  cols = max(1, max(len(r[1]) for r in rows))
  fig, axes = plt.subplots(len(rows), cols + 1,
                           figsize=((cols + 1) * 0.9, len(rows) * 1.1),
                           squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for r, (name, images, labels) in enumerate(rows):
    axes[r, 0].text(0.5, 0.5, name, ha="center", va="center", fontsize=7)
    for c, (image, label) in enumerate(zip(images, labels)):
      axes[r, c + 1].imshow(np.clip((image + 1) / 2, 0, 1))
      axes[r, c + 1].set_title(str(int(label)), fontsize=6, pad=1)
  fig.suptitle(title, fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status."""
  args = _parser().parse_args(argv)
  return cli.guarded("md-episode-grid", lambda: _main(args), args.verbose)


def _main(args) -> int:
  """The command proper; user errors end it through `cli.guarded`."""
  spec = spec_lib.load_dataset_spec(args.path)
  split = spec_lib.Split[args.split]
  cfg = sampling.EpisodeDescriptionConfig(
      num_ways=args.num_ways or None, num_support=args.num_support or None,
      num_query=args.num_query or None)
  md = simclr.augmentation_by_name(args.md_augmentation)
  md_episode = _episode(spec, split, cfg, args, 0.0, md)
  simclr_episode = _episode(spec, split, cfg, args, 1.0, md)
  draw(args.output, md_episode, simclr_episode,
       f"{spec.name} {split.name} episode {args.episode} (seed {args.seed}):"
       " as an MD episode, then as a SimCLR episode; titles are labels",
       args.max_images)
  print(f"wrote {args.output}")
  return 0


def run():
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
