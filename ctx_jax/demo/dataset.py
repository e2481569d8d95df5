r"""`ctx-make-demo-data`: writes the glyph dataset as Meta-Dataset records.

    ctx-make-demo-data --output_dir demo_data/glyphs [--baselines]

The images come from `glyphs.py`; the files (one `<class_id>.tfrecords` per
class plus `dataset_spec.json`) are written with the pipeline's
`records_writer`, in the official format, so the episode pipeline reads the
demo data exactly as it reads a converted Meta-Dataset source.
`--baselines` prints non-learned accuracies on the test episodes, computed by
the evaluation library (`ctx_jax.eval.baselines`) on the pipeline's episodes.
"""

import argparse
import os
import re
import shutil
import sys
import time
from typing import Callable, Sequence
import uuid

from PIL import Image

from ctx_jax.demo import glyphs
from ctx_jax.demo import render
from meta_dataset_pipeline import cli
from meta_dataset_pipeline import records_writer

# Record files the generator writes; `--overwrite` only replaces a folder
# holding nothing else, so it cannot delete unrelated files.
_DATASET_FILE_RE = re.compile(r"^(\d+\.tfrecords|dataset_spec\.json)$")
# Test episodes of `--baselines`.
BASELINE_EPISODES = 200


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


def generate_dataset(output_dir: str,
                     config: glyphs.DemoConfig = glyphs.DemoConfig(),
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
      images = render.render_class(config, class_id)
      counts.append(records_writer.write_class_records(
          staging, class_id,
          (render.encode_image(im, config.image_format, config.jpeg_quality)
           for im in images)))
      if log and ((class_id + 1) % 10 == 0 or
                  class_id + 1 == config.num_classes):
        log(f"  {class_id + 1}/{config.num_classes} classes "
            f"({time.time() - start:.1f} s)")
    spec = records_writer.dataset_spec_dict(
        name=name,
        classes_per_split=config.split_sizes(),
        images_per_class=counts,
        class_names=[glyphs.class_name(i) for i in range(config.num_classes)],
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


def render_preview(config: glyphs.DemoConfig, path: str,
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
    for col, image in enumerate(render.render_class(config, class_id,
                                             num_instances)):
      tile = Image.fromarray(image).resize((s, s), Image.Resampling.NEAREST)
      grid.paste(tile, (gap + col * (s + gap), gap + row * (s + gap)))
  with records_writer.atomic_output_path(path) as tmp:
    grid.save(tmp, format="PNG")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog="ctx-make-demo-data",
      description="Write the procedural-glyph demo dataset in the official "
      "Meta-Dataset record format (no download needed).")
  d = glyphs.DemoConfig()
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
  config = glyphs.DemoConfig(
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
    print_baselines(args.output_dir, config.image_size)
  return 0


def print_baselines(data_dir: str, image_size: int) -> None:
  """Non-learned 1-NN / nearest-mean accuracies on the demo's test episodes.

  The episodes are the ones a model is evaluated on (the demo config's
  5-way 5-shot test episodes through the Meta-Dataset pipeline, 48 px), and
  the statistics those of the evaluation library.
  """
  # pylint: disable=g-import-not-at-top
  from ctx_jax import mesh as mesh_lib
  from ctx_jax.eval import baselines
  from ctx_jax.eval import episodic
  from ctx_jax.eval import evaluate
  from experiments import demo
  # pylint: enable=g-import-not-at-top
  config = demo.get_config()
  config.data.records_root = os.path.dirname(os.path.abspath(data_dir))
  source = os.path.basename(os.path.abspath(data_dir))
  mesh = mesh_lib.make_mesh(1)
  features = {"raw pixels": None,
              "grey |z-score| pixels": baselines.grey_abs_zscore,
              "HOG shape features": baselines.hog_features}
  print(f"{BASELINE_EPISODES} 5-way 5-shot test episodes, images at "
        f"{config.data.image_size} px (stored at {image_size} px):",
        flush=True)
  for label, feature_fn in features.items():
    row = []
    for rule, classify in (("1-NN", baselines.nearest_neighbour),
                           ("nearest mean", baselines.nearest_class_mean)):
      summary = episodic.summarize(evaluate.source_accuracies(
          None, config, mesh, "TEST", source, BASELINE_EPISODES,
          config.eval.seed,
          baseline=lambda ep, c=classify, f=feature_fn: c(ep, f)))
      row.append(f"{rule} {summary}")
    print(f"  {label}: {', '.join(row)}", flush=True)


def run():
  """Console script `ctx-make-demo-data`: parses `sys.argv`."""
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  run()
