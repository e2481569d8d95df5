r"""ctx-eval: episodic evaluation of a model on Meta-Dataset domains.

  ctx-eval --config experiments/ctx_ilsvrc.py --model_dir runs/ctx/export \
      --sources=all --config.data.records_root=/data/records
  ctx-eval --config experiments/demo.py --model_dir runs/demo_ctx
  ctx-eval --config experiments/demo.py --model pixels   # raw-pixel 1-NN

The official protocol: the test classes of each domain, the config's episode
description (variable way and shot by default), 600 episodes per domain
(`config.eval.num_episodes`, or `--num_episodes`), a fixed episode seed
(`config.eval.seed`) so that two runs give the same numbers. `--sources=all`
means the ten Meta-Dataset domains.

Every episode is split over all devices (of all processes, with
`--distributed`). `--model_dir` is an export, or the work dir of a ctx-train
run: then its best-validation model (`<workdir>/best`) is evaluated, as the
official model selection. Prints a table of mean accuracy and 95% CI per
domain, their average and the published row that matches the config
(`--reference`: CTX, CTX+SimCLR Eps, CTX+SimCLR Eps+Aug or ProtoNet large
from the CTX paper, the official leaderboard row for an imported official
checkpoint; its source is printed and saved), and writes `<output>.json`,
`.csv` and a `.png` bar chart against that row. Per-episode accuracies are saved to
`<output>.episodes.json` every `--chunk_size` episodes; a rerun with the same
model, data and episode settings resumes from there (a changed setting starts
that domain afresh). A domain whose records are missing (or cannot give the
requested episodes) is reported as failed, naming the path, while the others
are still evaluated; the exit code is then 1.
"""

import json
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from ctx_jax import distributed
from ctx_jax import paths
from ctx_jax import xla_config
from ctx_jax.eval import references
from ctx_jax.eval import report
from ctx_jax.eval import resumable
from meta_dataset_pipeline import cli

ALL_SOURCES = references.ALL_SOURCES
# CTX+SimCLR Eps+Aug as the official leaderboard lists it (see references.py).
PAPER_CTX = references.REFERENCES["ctx_simclr_eps_aug"].accuracy
EPISODES_SUFFIX = ".episodes.json"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (data and episode settings).",
    lock_config=True)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Exported model (ctx-import-official output or "
    "<workdir>/export of a training run).")
_MODEL = flags.DEFINE_enum("model", "exported", ["exported", "pixels"],
                           "'pixels' evaluates the raw-pixel 1-NN baseline.")
_SOURCES = flags.DEFINE_list(
    "sources", None, "Domains to evaluate; 'all' = the ten Meta-Dataset "
    "domains (default: config.data.test_sources).")
_SPLIT = flags.DEFINE_enum("split", "TEST", ["TRAIN", "VALID", "TEST"],
                           "Split whose classes are evaluated.")
_NUM_EPISODES = flags.DEFINE_integer("num_episodes", None,
                                     "Episodes per domain (default: "
                                     "config.eval.num_episodes).")
_SEED = flags.DEFINE_integer("seed", None, "Episode seed (default: "
                             "config.eval.seed).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "JSON results path; the CSV, PNG and per-episode files "
    "sit beside it (default: <model_dir>/../eval_<split>.json).")
_CHUNK_SIZE = flags.DEFINE_integer(
    "chunk_size", 50, "Per-episode results are saved (and progress printed) "
    "every this many episodes.")
_RESUME = flags.DEFINE_bool("resume", True, "Reuse finished episodes from "
                            "<output>.episodes.json when their key matches.")
_CHART = flags.DEFINE_bool("chart", True, "Write the PNG bar chart.")
_REFERENCE = flags.DEFINE_enum(
    "reference", "auto", list(references.NAMES),
    "Published row shown beside ours: 'auto' picks the one matching the "
    "config (CTX, CTX+SimCLR Eps, CTX+SimCLR Eps+Aug, ProtoNet large; the "
    "official leaderboard row for an imported official checkpoint), 'none' "
    "shows none. Each number's source is printed and saved.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of "
                             "an error.")
flags.mark_flag_as_required("config")
PROG = "ctx-eval"
# Written by ctx-import-official into its export: the model is a released
# official checkpoint (compared with the official leaderboard row).
IMPORTED_FILE = "imported_from.json"


def expand_sources(sources: list[str]) -> list[str]:
  """`all` -> the ten domains; duplicates dropped, order kept."""
  out = []
  for s in sources:
    for name in (ALL_SOURCES if s == "all" else (s,)):
      if name not in out:
        out.append(name)
  return out


def load_model(model_dir: str, mesh):
  """The exported model, every array replicated over `mesh`.

  Restored straight onto the mesh, which also works when it spans several
  processes (the export's own sharding names devices of the process that
  wrote it).
  """
  from ctx_jax.checkpoints import export  # pylint: disable=g-import-not-at-top
  model, _ = export.load_exported_model_or_explain(model_dir, mesh=mesh)
  return model


def default_output(model_dir: str | None, split: str) -> epath.Path:
  base = paths.resolve(model_dir).parent if model_dir else paths.resolve(".")
  suffix = "" if model_dir else "_pixels"
  return base / f"eval_{split.lower()}{suffix}.json"


def resolve_model_dir(model_dir: str) -> tuple[str, dict[str, Any]]:
  """An export, or a training run's work dir -> its best-validation model.

  Given a work dir of `ctx-train` (no export of its own), the model reported
  for the run is `<workdir>/best` (official model selection), else
  `<workdir>/export` when the run did not validate.

  Returns:
    The export folder and what it is: {"selected": "best"|"export"|"given",
    "step": int|None, "imported": bool}.
  """
  config_file = "model_config.json"  # export.MODEL_CONFIG_FILE (no JAX yet)
  path = epath.Path(model_dir)
  info = {"selected": "given", "step": None,
          "imported": (path / IMPORTED_FILE).is_file()}
  if not path.exists():
    raise FileNotFoundError(f"--model_dir {path} does not exist")
  if not (path / config_file).is_file():
    for name, record in (("best", "valid.json"), ("export", "step.json")):
      if (path / name / config_file).is_file():
        saved = path / name / record
        step = (json.loads(saved.read_text()).get("step")
                if saved.is_file() else None)
        return str(path / name), {"selected": name, "step": step,
                                  "imported": False}
    raise FileNotFoundError(
        f"--model_dir {path} is neither an export (no "
        f"{config_file}) nor a ctx-train work dir (no best/ "
        "or export/)")
  return str(path), info


def main(argv):
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log a lot at INFO; `--verbosity=0` brings it back.
    logging.set_verbosity(logging.WARNING)
  if _MODEL.value == "exported" and not _MODEL_DIR.value:
    cli.fail(PROG, "--model_dir is required (or --model=pixels)")
  if _CHUNK_SIZE.value < 1:
    cli.fail(PROG, "--chunk_size must be at least 1")
  output = _OUTPUT.value
  if output is not None and not output.endswith(".json"):
    cli.fail(PROG, f"--output must end in .json: {output}")
  cli.guarded(PROG, _evaluate, _VERBOSE.value)


def _evaluate():
  """The evaluation proper; user errors propagate to `cli.guarded`."""
  # Start-up checks first: a bad model dir or config costs no JAX start-up.
  from ctx_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  model_dir, model_info = None, {"selected": "pixels", "step": None,
                                 "imported": False}
  if _MODEL.value == "exported":
    model_dir, model_info = resolve_model_dir(_MODEL_DIR.value)
  sources = expand_sources(_SOURCES.value or list(config.data.test_sources))
  for source in sources:
    config_checks.check_hierarchy(config.data.eval_episode, (source,),
                                  "config.data.eval_episode")
  # The raw-pixel baseline is no trained config: no reference unless asked.
  reference = (None if _MODEL.value == "pixels" and _REFERENCE.value == "auto"
               else references.choose(_REFERENCE.value, config,
                                      imported=model_info["imported"]))
  distributed.maybe_initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # tf.data runs on the host only; keep TF off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  split = _SPLIT.value
  output = paths.resolve(_OUTPUT.value or default_output(model_dir, split))
  # Multi-process: the cache sits beside the output, which every process
  # reaches (a training run's work dir: its programs are reused).
  xla_config.enable_compilation_cache(distributed.compilation_cache_dir(
      config.get("compilation_cache_dir", ""), output.parent))
  with distributed.fail_together(PROG, _VERBOSE.value):
    _evaluate_on_mesh(config, model_dir, model_info, sources, reference,
                      split, output)


def _evaluate_on_mesh(config, model_dir, model_info, sources, reference, split,
                      output):
  """Loads the model and evaluates every source (after JAX started)."""
  import jax  # pylint: disable=g-import-not-at-top

  from ctx_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  is_chief = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  model = None
  if model_dir is not None:
    model = load_model(model_dir, mesh)
    if is_chief and model_info["selected"] != "given":
      what = ("best-validation model" if model_info["selected"] == "best"
              else "final model (the run has no best/)")
      print(f"{PROG}: evaluating the run's {what}, {model_dir}"
            + (f" (step {model_info['step']})"
               if model_info["step"] is not None else ""), flush=True)
  num_episodes = _NUM_EPISODES.value or config.eval.num_episodes
  seed = config.eval.seed if _SEED.value is None else _SEED.value
  if is_chief:
    output.parent.mkdir(parents=True, exist_ok=True)
  cache = resumable.EpisodeCache(output.with_suffix(EPISODES_SUFFIX),
                                 _RESUME.value, write=is_chief)
  if is_chief:
    print(f"{PROG}: {len(sources)} domain(s), {num_episodes} {split} "
          f"episodes each, seed {seed}, {mesh.size} device(s) over "
          f"{jax.process_count()} process(es)", flush=True)
  rows = resumable.evaluate_sources(model, model_dir, config, mesh, split, sources,
                          num_episodes, seed, cache, _CHUNK_SIZE.value,
                          is_chief)
  if not is_chief:
    sys.exit(1 if any("error" in r for r in rows.values()) else 0)
  ref_acc = {}
  if reference is not None:
    ref_acc = {s: reference.accuracy[s] for s in rows
               if s in reference.accuracy}
  print(report.format_table(rows, reference=ref_acc or None))
  print(report.describe_reference(reference, rows))
  label = "pixel 1-NN" if model is None else "ours"
  results = {"split": split, "model": model_dir or _MODEL.value,
             "model_selected": model_info["selected"],
             "model_step": model_info["step"],
             "num_episodes": num_episodes, "seed": seed,
             "records_root": config.data.records_root,
             "results": rows, "average": report.average_row(rows),
             "reference": (None if reference is None else
                           dict(reference.as_dict(), accuracy=ref_acc,
                                ci95={s: reference.ci95[s] for s in ref_acc}))}
  paths.write_atomic(output, json.dumps(results, indent=2) + "\n")
  report.write_csv(output.with_suffix(".csv"), rows, ref_acc)
  written = [output, output.with_suffix(".csv")]
  if _CHART.value:
    report.write_chart(output.with_suffix(".png"), rows, label,
                reference if ref_acc else None)
    written.append(output.with_suffix(".png"))
  print("wrote " + ", ".join(map(str, written)))
  if any("error" in r for r in rows.values()):
    sys.exit(1)


def run():
  cli.quiet_tensorflow()
  app.run(main, flags_parser=cli.absl_flags_parser(
      PROG, __doc__, ["ctx_jax.eval.main", "ctx_jax.distributed"]))


if __name__ == "__main__":
  run()
