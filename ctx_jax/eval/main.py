r"""`ctx-eval`: episodic evaluation of an exported model on test sources.

  ctx-eval --config experiments/demo.py --model_dir runs/demo_ctx/export
  ctx-eval --config experiments/demo.py --model pixels   # raw-pixel 1-NN

The config supplies the data settings (records root, image size, episode
config, test sources, number of episodes); `--sources` and `--num_episodes`
override them. Prints a table of mean accuracy and 95% CI per source and
writes it as JSON. A source whose records are missing is reported as failed
(naming the path) while the others are still evaluated; the exit code is then
non-zero.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (data and episode settings).",
    lock_config=True)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Exported model (ctx-import-official output or "
    "<workdir>/export of a training run).")
_MODEL = flags.DEFINE_enum("model", "exported", ["exported", "pixels"],
                           "'pixels' evaluates the raw-pixel 1-NN baseline.")
_SOURCES = flags.DEFINE_list("sources", None, "Sources to evaluate (default: "
                             "config.data.test_sources).")
_SPLIT = flags.DEFINE_enum("split", "TEST", ["TRAIN", "VALID", "TEST"],
                           "Split whose classes are evaluated.")
_NUM_EPISODES = flags.DEFINE_integer("num_episodes", None,
                                     "Episodes per source (default: config).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results path (default: "
                              "<model_dir>/../eval_<split>.json).")
flags.mark_flag_as_required("config")


def format_table(rows: dict[str, dict], first_column: str = "source",
                 average: bool = True) -> str:
  """A fixed-width table of per-row accuracy (or error), with an average."""
  lines = [f"{first_column:<16} {'accuracy':>9} {'95% CI':>8} "
           f"{'episodes':>9}"]
  for source, row in rows.items():
    if "error" in row:
      lines.append(f"{source:<16} FAILED: {row['error']}")
    else:
      lines.append(f"{source:<16} {100 * row['mean']:>8.2f}% "
                   f"{100 * row['ci95']:>7.2f}% {row['num_episodes']:>9d}")
  good = [r for r in rows.values() if "error" not in r]
  if average and len(good) > 1:
    mean = sum(r["mean"] for r in good) / len(good)
    lines.append(f"{'average':<16} {100 * mean:>8.2f}%")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log a lot at INFO; `--verbosity=0` brings it back.
    logging.set_verbosity(logging.WARNING)
  from ctx_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  model = None
  if _MODEL.value == "exported":
    if not _MODEL_DIR.value:
      raise app.UsageError("--model_dir is required (or --model=pixels)")
    try:
      model, _ = checkpoint.load_exported_model(_MODEL_DIR.value)
    except FileNotFoundError as e:
      print(f"ctx-eval: error: {e}", file=sys.stderr)
      sys.exit(1)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  sources = _SOURCES.value or list(config.data.test_sources)
  num_episodes = _NUM_EPISODES.value or config.eval.num_episodes
  rows = {}
  for source in sources:
    try:
      summary = evaluate.evaluate_split(model, config, mesh, _SPLIT.value,
                                        source, num_episodes,
                                        seed=config.eval.seed)
      rows[source] = summary.as_dict()
    except (FileNotFoundError, ValueError) as e:
      logging.exception("evaluation of %s failed", source)
      rows[source] = {"error": str(e)}
    print(f"{source}: {rows[source]}", flush=True)
  print(format_table(rows))
  output = _OUTPUT.value
  if output is None:
    base = pathlib.Path(_MODEL_DIR.value or ".")
    output = (base.parent if _MODEL_DIR.value else base) / (
        f"eval_{_SPLIT.value.lower()}"
        f"{'_pixels' if model is None else ''}.json")
  pathlib.Path(output).write_text(json.dumps(
      {"split": _SPLIT.value, "model": _MODEL_DIR.value or _MODEL.value,
       "results": rows}, indent=2) + "\n")
  print(f"wrote {output}")
  if any("error" in r for r in rows.values()):
    sys.exit(1)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
