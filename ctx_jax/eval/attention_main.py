r"""ctx-attention: pictures of what a CTX model attends to in one episode.

  ctx-attention --model_dir runs/demo_ctx --records demo_data/glyphs \
      --split TEST --seed 0 --output attention/
  ctx-attention --model_dir official_export --episode episode.npz \
      --queries 0,4 --positions 2,3 --output attention/

For each chosen query (`--queries`) and feature-map position (`--positions`
"y,x;y,x", else an `--grid` x `--grid` grid), `query<i>_y<y>_x<x>.png`
shows the query with the position boxed and, for each class, the support
images overlaid with the attention of that position (a softmax per class:
each image's title is its share of the class's attention), the per-class
distances and the predicted class. `summary.png` shows, per query, the
attention averaged over all its positions on each class's most attended
support image. `attention.npz` holds the arrays of `models.inspect_episode`
for the chosen queries (plus `query_indices`).

The episode is an npz (`support_images` [S,H,X,3] in [-1, 1],
`support_labels` [S], `query_images` [Q,H,X,3], optional `query_labels`,
`support_mask`, `query_mask`), or episode `--episode_index` of the seeded
stream of a records folder (as md-episode-grid and ctx-eval draw them).
`--model_dir` is an export (ctx-import-official, <workdir>/export) or a
ctx-train work dir (its best-validation model). Batch norm uses the EMA
statistics, as evaluation does.
"""

import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import cli

PROG = "ctx-attention"
DEFAULT_IMAGE_SIZE = 84


def _parser():
  parser = cli.ArgumentParser(prog=PROG, description=__doc__.strip())
  parser.add_argument("--model_dir", required=True,
                      help="exported model or ctx-train work dir")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--episode", help="episode npz")
  source.add_argument("--records", help="records folder of one source "
                      "(with dataset_spec.json)")
  parser.add_argument("--output", required=True,
                      help="folder for the PNGs and attention.npz (new or "
                      "empty)")
  parser.add_argument("--queries", default=None,
                      help="comma-separated query indices (default: the "
                      "first three)")
  parser.add_argument("--positions", default=None,
                      help="feature-map positions 'y,x;y,x' (default: the "
                      "--grid)")
  parser.add_argument("--grid", type=int, default=2,
                      help="n: an n x n grid of positions when --positions "
                      "is not given")
  parser.add_argument("--max_support", type=int, default=6,
                      help="support images drawn per class")
  group = parser.add_argument_group("with --records")
  group.add_argument("--split", default="TEST", type=str.upper,
                     choices=("TRAIN", "VALID", "TEST"),
                     help="split whose classes are sampled")
  group.add_argument("--seed", type=int, default=0,
                     help="episode stream seed")
  group.add_argument("--episode_index", type=int, default=0,
                     help="which episode of the seeded stream")
  group.add_argument("--image_size", type=int, default=None,
                     help="image side (default: data.image_size of the "
                     "ctx-train run the model comes from, else "
                     f"{DEFAULT_IMAGE_SIZE})")
  group.add_argument("--num_ways", type=int, default=5,
                     help="0: variable (official sampler)")
  group.add_argument("--num_support", type=int, default=5,
                     help="shots per class; 0: variable")
  group.add_argument("--num_query", type=int, default=2,
                     help="queries per class; 0: variable")
  return parser


def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers, got "
                     f"{text!r}") from None
  if not values or min(values) < 0:
    raise ValueError(f"{flag} must list non-negative integers, got {text!r}")
  return values


def parse_positions(text: str) -> list[tuple[int, int]]:
  """'y,x;y,x' -> [(y, x), ...]."""
  out = []
  for part in text.split(";"):
    values = _int_list(part, "--positions")
    if len(values) != 2:
      raise ValueError(f"--positions: each position is 'y,x', got {part!r}")
    out.append((values[0], values[1]))
  return out


def _run_image_size(model_dir: pathlib.Path) -> int | None:
  """data.image_size of the ctx-train run that wrote `model_dir`, if any."""
  for folder in (model_dir, model_dir.parent):
    path = folder / "config.json"
    if path.is_file():
      try:
        return int(json.loads(path.read_text())["data"]["image_size"])
      except (ValueError, KeyError, TypeError):
        return None
  return None


def load_npz_episode(path: str) -> dict[str, np.ndarray]:
  """An episode npz with its masks (default all True); checks the keys."""
  with np.load(path) as data:
    episode = dict(data)
  missing = [k for k in ("support_images", "support_labels", "query_images")
             if k not in episode]
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)} (needs "
                     "support_images, support_labels, query_images)")
  for part in ("support", "query"):
    episode.setdefault(f"{part}_mask",
                       np.ones(len(episode[f"{part}_images"]), bool))
  return episode


def records_episode(args, image_size: int) -> tuple[dict, dict]:
  """Episode `--episode_index` of the seeded stream; (episode, names)."""
  # pylint: disable=g-import-not-at-top
  import itertools
  from meta_dataset_pipeline import dataset_spec as spec_lib
  from meta_dataset_pipeline import pipeline
  from meta_dataset_pipeline import sampling
  # pylint: enable=g-import-not-at-top
  spec = spec_lib.load_dataset_spec(args.records)
  cfg = sampling.EpisodeDescriptionConfig(
      num_ways=args.num_ways or None, num_support=args.num_support or None,
      num_query=args.num_query or None)
  ds = pipeline.make_one_source_episode_dataset(
      spec, spec_lib.Split[args.split], cfg, image_size, seed=args.seed)
  it = ds.as_numpy_iterator()
  episode = next(itertools.islice(it, args.episode_index, None))
  del it  # TF 2.21: do not keep generator-backed iterators alive.
  mask = episode["support_mask"]
  names = {int(label): spec.class_names.get(int(cid), str(cid))
           for label, cid in zip(episode["support_labels"][mask],
                                 episode["support_class_ids"][mask])}
  return episode, names


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  return cli.guarded(PROG, lambda: _main(args), args.verbose)


def _main(args) -> int:
  """The command proper; user errors end it through `cli.guarded`."""
  from ctx_jax.eval import main as eval_main  # pylint: disable=g-import-not-at-top
  queries = _int_list(args.queries, "--queries") if args.queries else None
  positions = parse_positions(args.positions) if args.positions else None
  if args.grid < 1 or args.max_support < 1:
    raise ValueError("--grid and --max_support must be at least 1")
  output = pathlib.Path(args.output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise FileExistsError(f"--output {output} exists and is not an empty "
                          "folder; give a new one (nothing is overwritten)")
  model_dir, _ = eval_main.resolve_model_dir(args.model_dir)
  names = None
  if args.episode:
    episode = load_npz_episode(args.episode)
    origin = pathlib.Path(args.episode).name
  else:
    image_size = (args.image_size or _run_image_size(pathlib.Path(model_dir))
                  or DEFAULT_IMAGE_SIZE)
    episode, names = records_episode(args, image_size)
    origin = (f"{pathlib.Path(args.records).name} {args.split} episode "
              f"{args.episode_index} (seed {args.seed}, {image_size}px)")
  real_queries = np.flatnonzero(episode["query_mask"])
  queries = queries or list(range(min(3, real_queries.size)))
  bad = [q for q in queries if q >= real_queries.size]
  if bad:
    raise ValueError(f"--queries {bad}: the episode has "
                     f"{real_queries.size} queries")
  rows = real_queries[queries]

  # pylint: disable=g-import-not-at-top
  from ctx_jax import models
  from ctx_jax.eval import figures
  from ctx_jax.checkpoints import export as checkpoint
  # pylint: enable=g-import-not-at-top
  model, _ = checkpoint.load_exported_model_or_explain(model_dir)
  chosen = dict(episode, query_images=episode["query_images"][rows])
  out = models.inspect_episode(model, chosen)
  h, w = out.attention.shape[1:3]
  positions = positions or figures.grid_positions(h, w, args.grid)
  outside = [p for p in positions if not (0 <= p[0] < h and 0 <= p[1] < w)]
  if outside:
    raise ValueError(f"--positions {outside} outside the {h}x{w} feature map")
  labels = episode.get("query_labels")
  true = None if labels is None else [int(labels[r]) for r in rows]

  output.mkdir(parents=True, exist_ok=True)
  written = []
  for k, q in enumerate(queries):
    for y, x in positions:
      path = output / f"query{q}_y{y}_x{x}.png"
      figures.save(figures.attention_figure(
          out, episode["support_images"], chosen["query_images"][k], k,
          (y, x), args.max_support, None if true is None else true[k],
          names, f"{origin}: query {q}, attention of position ({y}, {x})",
          query_name=q), path)
      written.append(path)
  figures.save(figures.summary_figure(
      out, episode["support_images"], chosen["query_images"], queries, true,
      f"{origin}: mean attention over query positions; * = predicted"),
               output / "summary.png")
  np.savez(output / "attention.npz", query_indices=np.asarray(queries),
           **out.as_dict())
  predicted = out.predictions
  for k, q in enumerate(queries):
    truth = "" if true is None else f" (true {true[k]})"
    print(f"query {q}: predicted class {predicted[k]}{truth}, distances "
          + " ".join(f"{d:.4g}" for d in out.distances[k]))
  print(f"wrote {len(written) + 2} files to {output} (summary.png, "
        "attention.npz and one PNG per query and position)")
  return 0


def run():
  cli.quiet_tensorflow()
  sys.exit(main())


if __name__ == "__main__":
  run()
