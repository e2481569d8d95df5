"""`md-episodes`: sample episode descriptions and summarise them.

    md-episodes PATH --split TRAIN --num_episodes 1000 --seed 0 \\
        [--num_ways 5 --num_support 5 --num_query 10 ...] \\
        [--output episodes.json] [--png episode.png --image_size 84]

PATH is a records folder (holding `dataset_spec.json`) or a spec file such
as an official `<name>_dataset_spec.json`. Every `EpisodeDescriptionConfig`
field is an option with the official default; `--num_support` also takes a
range `LOW,HIGH`. No image is read unless `--png` is given.

The JSON holds `{"episodes": [{"class_ids", "num_support", "num_query"}],
"summary": {...}}`, with class ids relative to the split as the official
sampler reports them, and histograms of ways, shots, set sizes, queries per
class and class frequencies in the summary. Descriptions are drawn exactly
as the episode pipeline with the same seed draws them, so with `--png` the
picture shows episode 0 of the JSON (it needs the records).
"""

import argparse
import collections
import dataclasses
import json
import sys
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import cli
from meta_dataset_pipeline import dataset_spec as spec_lib
from meta_dataset_pipeline import sampling


def _bool(text: str) -> bool:
  value = text.strip().lower()
  if value not in ("true", "false", "1", "0", "yes", "no"):
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
  return value in ("true", "1", "yes")


def _num_support(text: str):
  parts = [int(p) for p in text.split(",")]
  if len(parts) == 1:
    return parts[0]
  if len(parts) == 2:
    return tuple(parts)
  raise argparse.ArgumentTypeError("expected N or LOW,HIGH")


# What each official `EpisodeDescriptionConfig` field does (None: variable).
FIELD_HELP = {
    "num_ways": "fixed number of classes per episode (unset: variable way)",
    "num_support": "fixed shots per class, or LOW,HIGH sampled per episode "
                   "(unset: variable shot)",
    "num_query": "fixed queries per class (unset: variable)",
    "min_ways": "fewest classes in a variable-way episode",
    "max_ways_upper_bound": "most classes in a variable-way episode",
    "max_num_query": "most queries per class (variable query count)",
    "max_support_set_size": "most support images in an episode",
    "max_support_size_contrib_per_class": "most support images per class",
    "min_log_weight": "log of the smallest class-size weight of the "
                      "variable-shot sampler",
    "max_log_weight": "log of the largest class-size weight of the "
                      "variable-shot sampler",
    "ignore_dag_ontology": "sample ILSVRC classes uniformly, not from a "
                           "node of the ImageNet DAG",
    "ignore_bilevel_ontology": "sample Omniglot classes across alphabets",
    "ignore_hierarchy_probability": "probability that an episode of a "
                                    "hierarchical source ignores the "
                                    "hierarchy",
    "simclr_episode_fraction": "fraction of episodes turned into SimCLR "
                               "episodes (recorded, not applied here)",
    "min_examples_in_class": "classes with fewer images are never sampled",
    "num_unique_descriptions": "if > 0, cycle through this many distinct "
                               "episode descriptions",
    "episode_description_switch_frequency": "episodes that share one "
                                            "description before the next",
    "rng": "official: the official sampler's RandomState scheme, so --seed "
           "gives exactly its descriptions (default: numpy Generator)",
}


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="md-episodes", description=__doc__.strip())
  parser.add_argument("path", help="records folder or dataset spec file")
  parser.add_argument("--split", default="TRAIN",
                      choices=[s.name for s in spec_lib.Split],
                      type=str.upper, help="split whose classes are sampled")
  parser.add_argument("--num_episodes", type=int, default=1000,
                      help="episode descriptions to sample")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed, as the pipelines' (source 0, process 0)")
  parser.add_argument("--output", help="JSON file to write (descriptions "
                      "and summary)")
  parser.add_argument("--png", help="PNG of episode 0 (needs records)")
  parser.add_argument("--image_size", type=int, default=84,
                      help="image side for --png, pixels")
  parser.add_argument("--use_dag_ontology", type=_bool, default=None,
                      help="default: from the spec type and config")
  parser.add_argument("--use_bilevel_ontology", type=_bool, default=None,
                      help="default: from the spec type and config")
  config = parser.add_argument_group("EpisodeDescriptionConfig")
  for field in dataclasses.fields(sampling.EpisodeDescriptionConfig):
    default = field.default
    if field.name == "num_support":
      kind = _num_support
    elif field.name == "rng":
      config.add_argument("--rng", choices=sampling.RNG_MODES,
                          default=default, help=FIELD_HELP.get("rng", ""))
      continue
    elif isinstance(default, bool):
      kind = _bool
    elif isinstance(default, float):
      kind = float
    else:
      kind = int
    config.add_argument(f"--{field.name}", type=kind, default=default,
                        help=FIELD_HELP.get(field.name, ""))
  return parser


def _histogram(values) -> dict[str, int]:
  counts = collections.Counter(int(v) for v in values)
  return {str(k): counts[k] for k in sorted(counts)}


def _stats(values) -> dict[str, float]:
  values = np.asarray(values, dtype=np.float64)
  return {"mean": round(float(values.mean()), 3), "min": int(values.min()),
          "max": int(values.max())}


def summarize(descriptions, spec, split) -> dict:
  """Histograms and moments of sampled episode descriptions."""
  ways = [len(d.class_ids) for d in descriptions]
  shots = np.concatenate([d.num_support for d in descriptions])
  queries = [int(d.num_query[0]) for d in descriptions]
  support_sizes = [int(d.num_support.sum()) for d in descriptions]
  query_sizes = [int(d.num_query.sum()) for d in descriptions]
  classes = np.concatenate([d.class_ids for d in descriptions])
  num_classes = len(spec.get_classes(split))
  frequency = np.bincount(classes, minlength=num_classes)
  return {
      "dataset": spec.name, "split": split.name,
      "num_episodes": len(descriptions), "num_classes": num_classes,
      "ways": {**_stats(ways), "histogram": _histogram(ways)},
      "shots": {**_stats(shots), "histogram": _histogram(shots)},
      "queries_per_class": {**_stats(queries),
                            "histogram": _histogram(queries)},
      "support_set_size": {**_stats(support_sizes),
                           "histogram": _histogram(support_sizes)},
      "query_set_size": {**_stats(query_sizes),
                         "histogram": _histogram(query_sizes)},
      "class_frequency": {
          "classes_used": int((frequency > 0).sum()),
          "min": int(frequency.min()), "max": int(frequency.max()),
          "counts": {str(i): int(c) for i, c in enumerate(frequency)}},
  }


def _print_summary(summary, out=None):
  out = out or sys.stdout
  print(f"{summary['dataset']} {summary['split']}: "
        f"{summary['num_episodes']} episodes over "
        f"{summary['num_classes']} classes", file=out)
  for key in ("ways", "shots", "queries_per_class", "support_set_size",
              "query_set_size"):
    s = summary[key]
    print(f"  {key:18s} mean {s['mean']:8.2f}  min {s['min']:4d}  "
          f"max {s['max']:4d}", file=out)
  freq = summary["class_frequency"]
  print(f"  classes used       {freq['classes_used']} of "
        f"{summary['num_classes']} (episodes per class: min {freq['min']}, "
        f"max {freq['max']})", file=out)


def _write_png(path, spec, split, cfg, args):
  """Decodes episode 0 and draws support and query rows per class."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import pipeline  # pylint: disable=g-import-not-at-top

  ds = pipeline.make_one_source_episode_dataset(
      spec, split, cfg, args.image_size, seed=args.seed,
      use_dag_ontology=args.use_dag_ontology,
      use_bilevel_ontology=args.use_bilevel_ontology)
  episode = next(ds.as_numpy_iterator())
  ways = int(episode["num_ways"])
  rows = []
  for way in range(ways):
    row = []
    for part in ("support", "query"):
      mask = episode[f"{part}_mask"] & (episode[f"{part}_labels"] == way)
      row += [(part, img) for img in episode[f"{part}_images"][mask]]
    rows.append(row)
  cols = max(len(r) for r in rows)
  fig, axes = plt.subplots(ways, cols, figsize=(cols * 0.8, ways * 0.8),
                           squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for way, row in enumerate(rows):
    for col, (part, image) in enumerate(row):
      axes[way, col].imshow((image + 1) / 2)
      if part == "query":  # Frame queries so they stand out.
        axes[way, col].add_patch(plt.Rectangle(
            (0, 0), image.shape[1] - 1, image.shape[0] - 1, fill=False,
            edgecolor="red", linewidth=1))
  fig.suptitle(f"{spec.name} {split.name} episode 0: {ways} ways; support "
               "then query (red) per class", fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; returns the exit status."""
  args = _parser().parse_args(argv)
  return cli.guarded("md-episodes", lambda: _main(args), args.verbose)


def _main(args) -> int:
  try:
    spec = spec_lib.load_dataset_spec(args.path)
    # The seeding helpers live with the reader, which imports TensorFlow:
    # loaded once the spec is known to be good.
    from meta_dataset_pipeline import reader  # pylint: disable=g-import-not-at-top
    split = spec_lib.Split[args.split]
    cfg = sampling.EpisodeDescriptionConfig(**{
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(sampling.EpisodeDescriptionConfig)})
    # Same seeding as the pipelines (source 0 of process 0).
    seed = (sampling.official_rngs(args.seed, 1)[0] if cfg.rng == "official"
            else reader.derive_seeds([args.seed, 0], 2, 0, count=2))
    sampler = sampling.EpisodeDescriptionSampler(
        spec, split, cfg, seed=seed,
        use_dag_hierarchy=args.use_dag_ontology,
        use_bilevel_hierarchy=args.use_bilevel_ontology)
  except (OSError, ValueError, NotImplementedError) as e:
    cli.fail("md-episodes", e, args.verbose)
  stream = sampling.description_stream(sampler, np.random.default_rng(
      reader.derive_seeds([args.seed, 0], 1, count=2)))
  descriptions = [next(stream) for _ in range(args.num_episodes)]
  summary = summarize(descriptions, spec, split)
  summary["config"] = dataclasses.asdict(cfg)
  summary["seed"] = args.seed
  _print_summary(summary)
  if args.output:
    result = {
        "episodes": [{"class_ids": d.class_ids.tolist(),
                      "num_support": d.num_support.tolist(),
                      "num_query": d.num_query.tolist()}
                     for d in descriptions],
        "summary": summary,
    }
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f)
    print(f"wrote {args.output}")
  if args.png:
    try:
      _write_png(args.png, spec, split, cfg, args)
    except (OSError, ValueError) as e:
      cli.fail("md-episodes", e, args.verbose,
               f"cannot draw an episode: {cli.one_line(e)}")
    print(f"wrote {args.png}")
  return 0


def run():
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
