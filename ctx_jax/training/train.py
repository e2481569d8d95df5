"""`train_and_evaluate`: the whole training run, top to bottom.

Phases: check the work dir and the data (fail before compiling anything),
build the model and optimiser on the device mesh, resume (checkpoint in the
work dir, else `init_from`, else scratch), train with periodic logging,
validation and checkpoints, then export the model and evaluate it on the test
classes of every test source.
"""

import json
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from flax import nnx
import jax
import ml_collections
import numpy as np

from ctx_jax import xla_config
from ctx_jax.eval import evaluate
from ctx_jax.eval import figures
from ctx_jax.training import checkpoint as checkpoint_lib
from ctx_jax.training import config_checks
from ctx_jax.training import input_pipeline
from ctx_jax.training import mesh as mesh_lib
from ctx_jax.training import optim
from ctx_jax.training import sharded_step
from ctx_jax.training.state import create_train_state
from ctx_jax.training import train_step as step_lib

EXPORT_DIR = "export"
BEST_DIR = "best"
BEST_FILE = "valid.json"  # Inside BEST_DIR: step and validation accuracy.
RESULTS_FILE = "results.json"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as if the signal had killed us.


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint."""

  def __init__(self, step: int, ckpt_dir):
    super().__init__(
        f"preempted (SIGTERM) at step {step}; checkpoint saved in {ckpt_dir}. "
        "Run the same command again to resume.")
    self.step = step


def prepare_workdir(workdir: str) -> pathlib.Path:
  """Creates `workdir` and checks it is writable, with a clear error."""
  path = pathlib.Path(workdir).absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"work dir {path} is not writable: {e}") from e
  return path


def init_backbone_from(model: nnx.Module, export_dir: str,
                       mesh: jax.sharding.Mesh | None = None) -> int:
  """Copies the backbone (not the transformer head) of an export into `model`.

  Mirrors the official warm start, which restores backbone variables and
  their batch-norm EMA statistics but no `tformer_*` variable.

  Returns:
    The number of arrays copied.
  """
  source, _ = checkpoint_lib.load_exported_model_or_explain(export_dir,
                                                          mesh=mesh)
  src = nnx.to_flat_state(nnx.state(source))
  src = {path: var for path, var in src}
  state = nnx.state(model)
  copied = 0
  new_flat = []
  for path, var in nnx.to_flat_state(state):
    is_head = any(str(p).startswith("tformer") for p in path)
    if not is_head and path in src:
      value = src[path].get_value()
      if value.shape != var.get_value().shape:
        raise ValueError(f"init_from {export_dir}: {'/'.join(map(str, path))}"
                         f" has shape {value.shape}, expected "
                         f"{var.get_value().shape}")
      var = var.replace(value)
      copied += 1
    new_flat.append((path, var))
  if not copied:
    raise ValueError(f"init_from {export_dir}: no backbone variable matches "
                     "this model (different backbone?)")
  nnx.update(model, nnx.from_flat_state(new_flat))
  return copied


class Progress:
  """Console progress: step, loss, accuracy, episodes/s, images/s, ETA.

  Rates are measured between consecutive logs, starting at the first logged
  step, so the first step's compilation (and validation pauses, which are
  timed separately with `pause`) do not distort them.
  """

  def __init__(self, num_steps: int):
    self.num_steps = num_steps
    self.t0 = None
    self.first = 0
    self.images = 0  # Real (unpadded) images seen since the last log.
    self.paused = 0.0

  def pause(self, seconds: float) -> None:
    """Excludes `seconds` (validation, checkpoint export) from the rates."""
    self.paused += seconds

  def rates(self, step: int) -> dict[str, float]:
    """Episodes/s and images/s since the last call (empty on the first)."""
    now = time.time()
    if self.t0 is None:
      self.t0, self.first, self.images, self.paused = now, step, 0, 0.0
      return {}
    elapsed = max(now - self.t0 - self.paused, 1e-9)
    out = {"episodes_per_sec": (step - self.first) / elapsed,
           "images_per_sec": self.images / elapsed}
    self.t0, self.first, self.images, self.paused = now, step, 0, 0.0
    return out

  def log(self, step: int, metrics: dict[str, float]) -> str:
    """The console line; `metrics` may hold the output of `rates`."""
    if "episodes_per_sec" not in metrics:
      rates, eta = "compiling", "?"
    else:
      rate = metrics["episodes_per_sec"]
      rates = (f"{rate:.2f} episodes/s | {metrics['images_per_sec']:.0f} "
               "images/s")
      remaining = (self.num_steps - step) / max(rate, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime(remaining))
    return (f"step {step}/{self.num_steps} | loss {metrics['loss']:.4f} | "
            f"acc {100 * metrics['accuracy']:.1f}% | {rates} | ETA {eta}")


class PreemptionWatcher:
  """Notices SIGTERM so the loop can checkpoint and stop cleanly.

  Single process: a SIGTERM handler sets a flag, read after every step. Multi
  process: JAX's preemption service (started by `jax.distributed`) catches
  the signal and orbax's `reached_preemption` makes every process stop at the
  same step; installing a Python handler there would disable it.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._flag.set()

  def should_stop(self, step: int, ckpt) -> bool:
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def export_atomically(directory: pathlib.Path, model: nnx.Module,
                      model_config, extra: dict[str, Any] | None = None
                      ) -> None:
  """Writes an export to `directory`, replacing any earlier one atomically.

  The new export is written beside the old one and renamed over it, so a
  crash leaves either the old or the new export, never a mix (a leftover
  `<name>.old` is put back by `recover_export`).

  Args:
    directory: the export folder.
    model: the model to export.
    model_config: its config.
    extra: `{file name: JSON-able}` written into the export before it
      becomes visible.
  """
  tmp = directory.parent / f"{directory.name}.tmp"
  old = directory.parent / f"{directory.name}.old"
  if jax.process_index() == 0 and tmp.exists():
    shutil.rmtree(tmp)
  checkpoint_lib.export_model(tmp, model, model_config)
  if jax.process_index() == 0:
    for name, value in (extra or {}).items():
      (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    if directory.exists():
      directory.rename(old)
    tmp.rename(directory)
    if old.exists():
      shutil.rmtree(old)
  checkpoint_lib._sync("ctx_jax_export_swap")  # pylint: disable=protected-access


def recover_export(directory: pathlib.Path) -> None:
  """Undoes a swap of `export_atomically` interrupted between its renames."""
  old = directory.parent / f"{directory.name}.old"
  if jax.process_index() == 0 and old.exists():
    if directory.exists():
      shutil.rmtree(old)
    else:
      old.rename(directory)
  checkpoint_lib._sync("ctx_jax_export_recover")  # pylint: disable=protected-access


class BestExport:
  """Keeps `<workdir>/best`: an export of the best model on validation.

  `best/valid.json` records its step and validation accuracies; a resumed
  run reads it, so "best" spans the whole run.
  """

  def __init__(self, workdir: pathlib.Path):
    self.directory = workdir / BEST_DIR
    recover_export(self.directory)
    self.record = None
    if (self.directory / BEST_FILE).is_file():
      self.record = json.loads((self.directory / BEST_FILE).read_text())

  @property
  def accuracy(self) -> float:
    return -math.inf if self.record is None else self.record["accuracy"]

  def update(self, step: int, accuracy: float, per_source: dict,
             model: nnx.Module, model_config) -> bool:
    """Exports `model` if `accuracy` beats the best so far."""
    if not accuracy > self.accuracy:
      return False
    record = {"step": step, "accuracy": accuracy, "valid": per_source}
    export_atomically(self.directory, model, model_config, {BEST_FILE: record})
    self.record = record
    return True


def _check_finite(step: int, metrics: dict[str, float], ckpt_dir) -> None:
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics at step {step}: {bad}. Stopping; the "
        f"last good checkpoint is kept in {ckpt_dir}")


# Checked before every checkpoint: a step can leave finite loss but broken
# parameters (the loss is computed before the update).
_GUARDED = ("total_loss", "grad_norm", "param_norm")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains per `config`, writing to `workdir`; returns the test results."""
  # Fail on a bad config or missing or malformed data before the work dir
  # is created or anything is compiled.
  config_checks.check_start_up(config, workdir)
  workdir = prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # Compiled steps are kept on disk: a restarted run does not compile again.
  cache_dir = xla_config.enable_compilation_cache(
      config.get("compilation_cache_dir", ""))
  logging.info("persistent compilation cache: %s", cache_dir)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  train_fn, _ = sharded_step.select_steps(config.train.parallelism, mesh)
  logging.info("process %d/%d, %d local / %d global devices, mesh %s",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), mesh.shape)
  model, optimizer = create_train_state(config, mesh)
  ckpt = checkpoint_lib.TrainCheckpointer(
      workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
  start_step = 0
  if ckpt.latest_step() is not None:
    start_step, data = ckpt.restore(model, optimizer)
    if data.get("seed", config.seed) != config.seed:
      raise ValueError(
          f"{ckpt.directory} was trained with seed={data['seed']}, but "
          f"config.seed={config.seed}: the run would not continue the same "
          "episode stream. Use the original seed or a new work dir.")
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  elif config.init_from:
    n = init_backbone_from(model, config.init_from, mesh)
    logging.info("initialised %d backbone arrays from %s", n, config.init_from)

  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(config).items()})

  num_ways = input_pipeline.max_ways(config, "TRAIN")
  wd = float(config.optimizer.weight_decay)
  # One seeded episode stream per run; a resumed run starts it at the
  # episode it had reached, so it sees exactly the episodes an uninterrupted
  # run would (the skipped ones are sampled, not read).
  train_stream = input_pipeline.episodes(
      config, "TRAIN", config.data.train_sources, seed=config.seed,
      pad_multiple=mesh.size, process_index=jax.process_index(),
      process_count=jax.process_count(), start_episode=start_step)
  aug_keys, device_augment = input_pipeline.device_augmenter(config)
  batches = mesh_lib.prefetch_to_mesh(train_stream, mesh,
                                      step_lib.MODEL_INPUT_KEYS + aug_keys)
  schedule = optim.learning_rate_schedule(config.optimizer)
  progress = Progress(config.train.num_steps)
  best = BestExport(workdir)
  preemption = PreemptionWatcher()
  step = start_step
  data_position = lambda: {"seed": config.seed, "episodes": step}
  try:
    with metric_writers.ensure_flushes(writer), jax.set_mesh(mesh):
      model.train()
      while step < config.train.num_steps:
        episode, host = next(batches)
        if device_augment is not None:
          episode = device_augment(episode)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          metrics = train_fn(model, optimizer, episode, num_ways, wd)
        step += 1
        progress.images += int(np.sum(host["support_mask"]) +
                               np.sum(host["query_mask"])
                               ) * jax.process_count()
        logging.log_first_n(logging.INFO, "finished step %d", 3, step)
        last = step == config.train.num_steps
        if (step % config.train.log_every == 0 or last
            or step == start_step + 1):
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(step, values, ckpt.directory)
          values["learning_rate"] = float(schedule(step - 1))
          values.update(progress.rates(step))
          writer.write_scalars(step, values)
          if is_chief:
            print(progress.log(step, values), flush=True)
        stop = preemption.should_stop(step, ckpt)
        if step % config.train.checkpoint_every == 0 or last or stop:
          _check_finite(step, {k: float(metrics[k]) for k in _GUARDED},
                        ckpt.directory)
          ckpt.save(step, model, optimizer, data=data_position(),
                    force=last or stop)
        if stop:
          ckpt.wait_until_finished()
          raise Preempted(step, ckpt.directory)
        if config.train.valid_every and (step % config.train.valid_every == 0
                                         or last):
          t0 = time.time()
          _validate(config, model, mesh, step, writer, best, is_chief)
          model.train()
          progress.pause(time.time() - t0)
  finally:
    preemption.close()
    # Drop the tf.data iterators now: TF 2.21 can hang at interpreter exit
    # while a generator-backed iterator is still alive.
    batches.close()
    train_stream.close()
    ckpt.wait_until_finished()
    ckpt.close()

  # The final model (a resumed, longer run replaces the earlier export).
  export_dir = workdir / EXPORT_DIR
  recover_export(export_dir)
  export_atomically(export_dir, model, config.model,
                    {"step.json": {"step": step}})
  # Model selection as the official (`analysis/select_best_model.py`): the
  # reported test figure is that of the best validation checkpoint; the final
  # model's is kept beside it, labelled.
  final_test = _test_all(model, config, mesh, is_chief, "final")
  results = {"step": step, "test": final_test, "final_test": final_test,
             "selected": {"model": EXPORT_DIR, "step": step,
                          "reason": "no validation (train.valid_every=0)"}}
  if best.record is not None:
    best_step = best.record["step"]
    results["best_valid"] = {"step": best_step,
                             "accuracy": best.record["accuracy"]}
    results["selected"] = {"model": BEST_DIR, "step": best_step,
                           "reason": "best validation accuracy"}
    if best_step != step:
      best_model, _ = checkpoint_lib.load_exported_model(best.directory,
                                                         mesh=mesh)
      results["test"] = _test_all(best_model, config, mesh, is_chief,
                                  f"best-validation (step {best_step})")
  writer.write_scalars(step, {
      f"test/{s}/accuracy": r["mean"] for s, r in results["test"].items()}
                       | {f"test_final/{s}/accuracy": r["mean"]
                          for s, r in final_test.items()})
  if is_chief:
    print(f"reported: the model of step {results['selected']['step']} "
          f"({results['selected']['reason']})", flush=True)
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
  return results


def _test_all(model, config, mesh, is_chief, label: str) -> dict[str, Any]:
  """Test figures of `model` on every test source (same episodes each call)."""
  out = {}
  for source in config.data.test_sources:
    summary = evaluate.evaluate_split(model, config, mesh, "TEST", source,
                                      config.eval.num_episodes,
                                      seed=config.eval.seed)
    out[source] = summary.as_dict()
    if is_chief:
      print(f"test {source}, {label} model: {summary} over "
            f"{summary.num_episodes} episodes", flush=True)
  return out


def _validate(config, model, mesh, step, writer, best, is_chief) -> None:
  """Validation on every valid source; exports the model if it is the best.

  The selection metric is the mean over valid sources of their mean episode
  accuracy (one source: its accuracy), as the official trainer's.
  """
  valid = {s: evaluate.evaluate_split(model, config, mesh, "VALID", s,
                                      config.train.num_valid_episodes,
                                      seed=config.eval.seed)
           for s in config.data.valid_sources}
  accuracy = float(np.mean([v.mean for v in valid.values()]))
  writer.write_scalars(step, {f"valid/{s}/accuracy": v.mean
                              for s, v in valid.items()}
                       | {"valid/accuracy": accuracy})
  if config.eval.get("attention_images"):
    figures.write_validation_images(config, model, mesh, step, writer)
  improved = best.update(step, accuracy,
                         {s: v.as_dict() for s, v in valid.items()}, model,
                         config.model)
  if is_chief:
    print(f"step {step} validation: " + ", ".join(
        f"{s} {v}" for s, v in valid.items())
          + (" (best so far, exported to best/)" if improved else ""),
          flush=True)


def _flatten(config: ml_collections.ConfigDict, prefix: str = ""):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
