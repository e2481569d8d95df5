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

import csv
import hashlib
import json
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctx_jax import distributed
from ctx_jax import xla_config
from ctx_jax.eval import references
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


def format_table(rows: dict[str, dict], first_column: str = "source",
                 average: bool = True,
                 reference: dict[str, float] | None = None) -> str:
  """A fixed-width table of per-row accuracy (or error), with an average.

  Args:
    rows: name -> {mean, ci95, num_episodes} (fractions) or {error}.
    first_column: header of the name column.
    average: add the mean over the rows that did not fail.
    reference: optional name -> published accuracy (%), shown as a column
      ("ref."); say which row and its source beside the table.

  Returns:
    The table as text.
  """
  ref_header = f" {'ref.':>7}" if reference else ""
  lines = [f"{first_column:<16} {'accuracy':>9} {'95% CI':>8} "
           f"{'episodes':>9}{ref_header}"]

  def ref(name):
    if not reference:
      return ""
    value = reference.get(name)
    return f" {value:>6.2f}%" if value is not None else f" {'-':>7}"

  for source, row in rows.items():
    if "error" in row:
      lines.append(f"{source:<16} FAILED: {row['error']}")
    else:
      lines.append(f"{source:<16} {100 * row['mean']:>8.2f}% "
                   f"{100 * row['ci95']:>7.2f}% {row['num_episodes']:>9d}"
                   f"{ref(source)}")
  good = {k: r for k, r in rows.items() if "error" not in r}
  if average and len(good) > 1:
    mean = sum(r["mean"] for r in good.values()) / len(good)
    paper = ""
    if reference and all(k in reference for k in good):
      paper_mean = sum(reference[k] for k in good) / len(good)
      paper = f" {'':>8} {'':>9} {paper_mean:>6.2f}%"
    lines.append(f"{'average':<16} {100 * mean:>8.2f}%{paper}")
  return "\n".join(lines)


def average_row(rows: dict[str, dict]) -> dict[str, Any] | None:
  """Mean accuracy over the domains that did not fail (None if none did)."""
  good = [r for r in rows.values() if "error" not in r]
  if not good:
    return None
  return {"mean": sum(r["mean"] for r in good) / len(good),
          "num_sources": len(good)}


def _fingerprint_dir(path: pathlib.Path) -> str:
  """Hash of the names, sizes and modification times of files under `path`."""
  digest = hashlib.sha256()
  for f in sorted(p for p in path.rglob("*") if p.is_file()):
    stat = f.stat()
    digest.update(f"{f.relative_to(path)}\0{stat.st_size}\0"
                  f"{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def model_key(model_dir: str | None) -> dict[str, Any]:
  """What identifies the evaluated model: its export's config and state."""
  if model_dir is None:
    return {"model": "pixels"}
  path = pathlib.Path(model_dir).absolute()
  from ctx_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  return {"model": str(path),
          "model_config": checkpoint.load_model_config(path).to_dict(),
          "model_state": _fingerprint_dir(path / checkpoint.STATE_DIR)}


def source_key(config, split: str, source: str, num_episodes: int,
               seed: int) -> dict[str, Any]:
  """What determines one domain's episodes (beyond the model)."""
  data = config.data
  episode = data.train_episode if split == "TRAIN" else data.eval_episode
  root = pathlib.Path(data.records_root or ".").absolute()
  spec = root / source / "dataset_spec.json"
  spec_hash = (hashlib.sha256(spec.read_bytes()).hexdigest()
               if spec.is_file() else None)
  return {"split": split, "source": source, "records_root": str(root),
          "dataset_spec_sha256": spec_hash, "episode": episode.to_dict(),
          "image_size": int(data.image_size),
          "shuffle_buffer_size": int(data.shuffle_buffer_size),
          "seed": int(seed), "num_episodes": int(num_episodes)}


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


class EpisodeCache:
  """Per-episode accuracies of finished work, saved after every chunk.

  File layout: `{"sources": {name: {"key": {...}, "accuracies": [...]}}}`.
  Only the chief process writes; every write is atomic, so an interrupted
  evaluation never loses (or corrupts) what was already saved.
  """

  def __init__(self, path: pathlib.Path, resume: bool, write: bool):
    self.path, self.write = path, write
    self.data = {"sources": {}}
    if resume and path.is_file():
      try:
        self.data = json.loads(path.read_text())
        self.data.setdefault("sources", {})
      except (json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path} is not a readable ctx-eval episode file "
                         f"({e}); move it away or pass --noresume") from e

  def done(self, source: str, key: dict[str, Any]) -> list[float]:
    """Saved accuracies for `source` if saved under the same `key`."""
    entry = self.data["sources"].get(source)
    if entry is None:
      return []
    if entry.get("key") != key:
      changed = sorted(k for k in set(key) | set(entry.get("key", {}))
                       if key.get(k) != entry.get("key", {}).get(k))
      logging.warning("%s: saved episodes of %s were made with different %s;"
                      " starting afresh", self.path, source, changed)
      print(f"{source}: settings changed ({', '.join(changed)}); saved "
            "episodes discarded", flush=True)
      return []
    return list(entry["accuracies"])[:key["num_episodes"]]

  def save(self, source: str, key: dict[str, Any],
           accuracies: list[float]) -> None:
    self.data["sources"][source] = {"key": key,
                                    "accuracies": list(accuracies)}
    if self.write:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      write_atomic(self.path, json.dumps(self.data) + "\n")


def write_csv(path: pathlib.Path, rows: dict[str, dict],
              reference: dict[str, float] | None = None) -> None:
  """Per-domain rows (%), with the reference's accuracy when there is one."""
  lines = [["source", "accuracy_pct", "ci95_pct", "num_episodes",
            "reference_pct", "error"]]
  for source, row in rows.items():
    paper = (reference or {}).get(source, "")
    if "error" in row:
      lines.append([source, "", "", "", paper, row["error"]])
    else:
      lines.append([source, f"{100 * row['mean']:.4f}",
                    f"{100 * row['ci95']:.4f}", row["num_episodes"], paper,
                    ""])
  avg = average_row(rows)
  if avg and avg["num_sources"] > 1:
    lines.append(["average", f"{100 * avg['mean']:.4f}", "", "", "", ""])
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  with tmp.open("w", newline="") as f:
    csv.writer(f).writerows(lines)
  os.replace(tmp, path)


def write_chart(path: pathlib.Path, rows: dict[str, dict], label: str,
                reference: references.Reference | None = None) -> None:
  """Bar chart: our accuracy (95% CI whiskers) next to the reference's."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = list(rows)
  x = np.arange(len(names))
  ours = [100 * rows[n]["mean"] if "error" not in rows[n] else 0.0
          for n in names]
  err = [100 * rows[n]["ci95"] if "error" not in rows[n] else 0.0
         for n in names]
  ref_acc = reference.accuracy if reference is not None else {}
  paper = [ref_acc.get(n, np.nan) for n in names]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
  width = 0.4
  ax.bar(x - width / 2, ours, width, yerr=err, capsize=3, label=label,
         color="tab:blue")
  if not all(np.isnan(paper)):
    ax.bar(x + width / 2, paper, width, label=reference.label,
           color="tab:gray")
  for i, n in enumerate(names):
    if "error" in rows[n]:
      ax.text(x[i] - width / 2, 1, "failed", rotation=90, ha="center",
              va="bottom", color="tab:red", fontsize=8)
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(loc="upper right", fontsize=8)
  ax.set_title("Meta-Dataset episodic accuracy (95% CI)")
  fig.tight_layout()
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def load_model(model_dir: str, mesh):
  """The exported model, every array replicated over `mesh`.

  Restored straight onto the mesh, which also works when it spans several
  processes (the export's own sharding names devices of the process that
  wrote it).
  """
  from ctx_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  model, _ = checkpoint.load_exported_model_or_explain(model_dir, mesh=mesh)
  return model


def default_output(model_dir: str | None, split: str) -> pathlib.Path:
  base = pathlib.Path(model_dir).absolute().parent if model_dir else (
      pathlib.Path.cwd())
  suffix = "" if model_dir else "_pixels"
  return base / f"eval_{split.lower()}{suffix}.json"


def evaluate_sources(model, model_dir, config, mesh, split, sources,
                     num_episodes, seed, cache: EpisodeCache,
                     chunk_size: int, is_chief: bool) -> dict[str, dict]:
  """Evaluates each source (resuming from `cache`); failures become rows."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import episodic  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  log = print if is_chief else (lambda _: None)
  base_key = model_key(model_dir)
  rows = {}
  for source in sources:
    try:
      input_pipeline.data_source_dir(config.data, source)
      key = dict(base_key, **source_key(config, split, source, num_episodes,
                                        seed))
      accuracies = cache.done(source, key)
      start = len(accuracies)
      if jax.process_count() > 1:
        # Every process must skip the same episodes: the chief's file rules.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
        if not is_chief:
          accuracies = [float("nan")] * start
      if start:
        log(f"{source}: resuming, {start}/{num_episodes} episodes already "
            f"done ({cache.path})")
      progress = episodic.RateLogger(source, num_episodes, start, log=log)

      def on_chunk(values, source=source, key=key, accuracies=accuracies,
                   progress=progress):
        accuracies.extend(values)
        cache.save(source, key, accuracies)
        progress(len(accuracies))

      if start < num_episodes:
        evaluate.source_accuracies(
            model, config, mesh, split, source, num_episodes, seed,
            start=start, chunk_size=chunk_size, on_chunk=on_chunk)
      rows[source] = episodic.summarize(accuracies).as_dict()
    except FileNotFoundError as e:
      rows[source] = {"error": str(e)}
    except ValueError as e:
      logging.exception("evaluation of %s failed", source)
      rows[source] = {"error": str(e)}
    if "error" in rows[source]:
      log(f"{source}: FAILED: {rows[source]['error']}")
    else:
      log(f"{source}: {100 * rows[source]['mean']:.2f} ± "
          f"{100 * rows[source]['ci95']:.2f}% over {num_episodes} episodes")
  return rows


def resolve_model_dir(model_dir: str) -> tuple[str, dict[str, Any]]:
  """An export, or a training run's work dir -> its best-validation model.

  Given a work dir of `ctx-train` (no export of its own), the model reported
  for the run is `<workdir>/best` (official model selection), else
  `<workdir>/export` when the run did not validate.

  Returns:
    The export folder and what it is: {"selected": "best"|"export"|"given",
    "step": int|None, "imported": bool}.
  """
  config_file = "model_config.json"  # checkpoint.MODEL_CONFIG_FILE (no JAX yet)
  path = pathlib.Path(model_dir)
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
  from ctx_jax.training import config_checks  # pylint: disable=g-import-not-at-top
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
  from ctx_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  xla_config.enable_compilation_cache(config.get("compilation_cache_dir", ""))
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
  split = _SPLIT.value
  output = pathlib.Path(_OUTPUT.value or default_output(model_dir, split))
  if is_chief:
    output.parent.mkdir(parents=True, exist_ok=True)
  cache = EpisodeCache(output.with_suffix(EPISODES_SUFFIX), _RESUME.value,
                       write=is_chief)
  if is_chief:
    print(f"{PROG}: {len(sources)} domain(s), {num_episodes} {split} "
          f"episodes each, seed {seed}, {mesh.size} device(s) over "
          f"{jax.process_count()} process(es)", flush=True)
  rows = evaluate_sources(model, model_dir, config, mesh, split, sources,
                          num_episodes, seed, cache, _CHUNK_SIZE.value,
                          is_chief)
  if not is_chief:
    sys.exit(1 if any("error" in r for r in rows.values()) else 0)
  ref_acc = {}
  if reference is not None:
    ref_acc = {s: reference.accuracy[s] for s in rows
               if s in reference.accuracy}
  print(format_table(rows, reference=ref_acc or None))
  print(describe_reference(reference, rows))
  label = "pixel 1-NN" if model is None else "ours"
  results = {"split": split, "model": model_dir or _MODEL.value,
             "model_selected": model_info["selected"],
             "model_step": model_info["step"],
             "num_episodes": num_episodes, "seed": seed,
             "records_root": config.data.records_root,
             "results": rows, "average": average_row(rows),
             "reference": (None if reference is None else
                           dict(reference.as_dict(), accuracy=ref_acc,
                                ci95={s: reference.ci95[s] for s in ref_acc}))}
  write_atomic(output, json.dumps(results, indent=2) + "\n")
  write_csv(output.with_suffix(".csv"), rows, ref_acc)
  written = [output, output.with_suffix(".csv")]
  if _CHART.value:
    write_chart(output.with_suffix(".png"), rows, label,
                reference if ref_acc else None)
    written.append(output.with_suffix(".png"))
  print("wrote " + ", ".join(map(str, written)))
  if any("error" in r for r in rows.values()):
    sys.exit(1)


def describe_reference(reference: references.Reference | None,
                       rows: dict[str, dict]) -> str:
  """One line under the table: which published row "ref." is, and whence."""
  if reference is None:
    return ("reference: none (no published row matches this config; "
            "--reference <name> picks one)")
  if not reference.available:
    return f"reference: {reference.label}: {reference.source}"
  if not any(s in reference.accuracy for s in rows):
    return (f"reference: {reference.label} has no number for these "
            "domains")
  return f"ref. = {reference.label}; source: {reference.source}"


def run():
  cli.quiet_tensorflow()
  app.run(main, flags_parser=cli.absl_flags_parser(
      PROG, __doc__, ["ctx_jax.eval.main", "ctx_jax.distributed"]))


if __name__ == "__main__":
  run()
