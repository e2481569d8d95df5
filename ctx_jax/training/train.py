"""`train_and_evaluate`: the whole training run, top to bottom.

Phases: check the config and the data (fail before the work dir is created or
anything is compiled), build the model and optimiser on the device mesh,
resume (checkpoint in the work dir, else `init_from`, else scratch), train
with periodic logging, validation and checkpoints, then export the model and
evaluate the selected one on the test classes of every test source.

The pieces live beside this file: `workdir.py` (what a run writes),
`state.py` (model and optimiser), `train_step.py` / `sharded_step.py` (the
jitted steps), `progress.py`, `preemption.py`, `validation.py`.
"""

import json
import math
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from ctx_jax import config_checks
from ctx_jax import distributed
from ctx_jax import mesh as mesh_lib
from ctx_jax import xla_config
from ctx_jax.checkpoints import export
from ctx_jax.checkpoints import train_state
from ctx_jax.data import input_pipeline
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import optim
from ctx_jax.training import preemption as preemption_lib
from ctx_jax.training import progress as progress_lib
from ctx_jax.training import sharded_step
from ctx_jax.training import state as state_lib
from ctx_jax.training import validation
from ctx_jax.training import workdir as workdir_lib


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
  """Trains per `config`, writing to `workdir`; returns the test results.

  In a multi-process run, an error in any process (a bad record, a decode
  error, a non-finite loss, any exception) stops every process within
  seconds, each printing the same `ctx-train: error: process <i>: ...` line
  and exiting 1 (`distributed.fail_together`).
  """
  config_checks.check_start_up(config, workdir)
  with distributed.fail_together(
      PROG, passthrough=(preemption_lib.Preempted,)):
    return _train_and_evaluate(config, workdir)


PROG = "ctx-train"


def _train_and_evaluate(config, workdir):
  """`train_and_evaluate` after the start-up checks."""
  workdir = workdir_lib.prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  # Compiled steps are kept on disk: a restarted run does not compile again.
  # Multi-process: in the work dir, which every host reads (JAX writes
  # entries from process 0 only; see distributed.compilation_cache_dir).
  cache_dir = xla_config.enable_compilation_cache(
      distributed.compilation_cache_dir(
          config.get("compilation_cache_dir", ""), workdir))
  cache_events = distributed.count_cache_events()
  logging.info("persistent compilation cache: %s", cache_dir)
  mesh = mesh_lib.make_mesh(config.num_devices or None)
  logging.info("process %d/%d, %d local / %d global devices, mesh %s",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), mesh.shape)
  model, optimizer = state_lib.create_train_state(config, mesh)
  ckpt = train_state.TrainCheckpointer(
      workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
  start_step = _resume(config, ckpt, model, optimizer, mesh)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(config).items()})
  best = workdir_lib.BestExport(workdir)
  step = _train_loop(config, model, optimizer, mesh, ckpt, writer, best,
                     start_step)
  results = _test_and_report(config, workdir, model, mesh, writer, best, step)
  if jax.process_count() > 1 and cache_dir:
    print(f"process {jax.process_index()}: compiled {cache_events['misses']} "
          f"program(s), loaded {cache_events['hits']} from the cache "
          f"{cache_dir}", flush=True)
  return results


def _resume(config, ckpt, model, optimizer, mesh) -> int:
  """Restores the latest checkpoint, else `init_from`; returns the step."""
  if ckpt.latest_step() is not None:
    start_step, data = ckpt.restore(model, optimizer)
    if data.get("seed", config.seed) != config.seed:
      raise ValueError(
          f"{ckpt.directory} was trained with seed={data['seed']}, but "
          f"config.seed={config.seed}: the run would not continue the same "
          "episode stream. Use the original seed or a new work dir.")
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
    return start_step
  if config.init_from:
    n = state_lib.init_backbone_from(model, config.init_from, mesh)
    logging.info("initialised %d backbone arrays from %s", n, config.init_from)
  return 0


def _train_loop(config, model, optimizer, mesh, ckpt, writer, best,
                start_step: int) -> int:
  """Trains from `start_step` to `config.train.num_steps`; returns the step."""
  train_fn, _ = sharded_step.select_steps(config.train.parallelism, mesh)
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
  # Multi-process: all processes check they feed the same episode (index,
  # seed, padded sizes) before its global array is built.
  checked = distributed.check_agreement(
      train_stream, "train", config.seed, start=start_step,
      every=int(config.train.get("agree_every", distributed.AGREE_EVERY)))
  batches = mesh_lib.prefetch_to_mesh(checked, mesh,
                                      episode_lib.MODEL_INPUT_KEYS + aug_keys)
  schedule = optim.learning_rate_schedule(config.optimizer)
  num_steps = config.train.num_steps
  progress = progress_lib.Progress(num_steps, config.train.log_every, writer)
  preemption = preemption_lib.PreemptionWatcher()
  is_chief = jax.process_index() == 0
  step = start_step
  try:
    with metric_writers.ensure_flushes(writer), jax.set_mesh(mesh):
      model.train()
      while step < num_steps:
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
        reported = progress(step)
        last = step == num_steps
        if reported or step == start_step + 1:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(step, values, ckpt.directory)
          values["learning_rate"] = float(schedule(step - 1))
          if reported:
            values.update(progress.rates)
          writer.write_scalars(step, values)
          if is_chief:
            print(progress.line(step, values, reported), flush=True)
        stop = preemption.should_stop(step, ckpt)
        if step % config.train.checkpoint_every == 0 or last or stop:
          _check_finite(step, {k: float(metrics[k]) for k in _GUARDED},
                        ckpt.directory)
          ckpt.save(step, model, optimizer,
                    data={"seed": config.seed, "episodes": step},
                    force=last or stop)
        if stop:
          ckpt.wait_until_finished()
          raise preemption_lib.Preempted(step, ckpt.directory)
        if config.train.valid_every and (step % config.train.valid_every == 0
                                         or last):
          with progress.paused("validation"):
            validation.validate(config, model, mesh, step, writer, best,
                                is_chief)
          model.train()
  except Exception as e:  # pylint: disable=broad-except
    # Multi-process: tell the others now, before the clean-up below, which
    # could wait for processes stuck in a collective.
    distributed.fail_now(e)
    raise
  finally:
    preemption.close()
    # Drop the tf.data iterators now: TF 2.21 can hang at interpreter exit
    # while a generator-backed iterator is still alive.
    batches.close()
    train_stream.close()
    ckpt.wait_until_finished()
    ckpt.close()
  return step


def _test_and_report(config, workdir, model, mesh, writer, best,
                     step: int) -> dict[str, Any]:
  """Exports the final model, tests the selected one, writes results.json.

  Model selection as the official (`analysis/select_best_model.py`): the
  reported test figure is that of the best validation checkpoint; the final
  model's is kept beside it, labelled.
  """
  is_chief = jax.process_index() == 0
  # The final model (a resumed, longer run replaces the earlier export).
  export_dir = workdir / workdir_lib.EXPORT_DIR
  export.recover_export(export_dir)
  export.export_atomically(export_dir, model, config.model,
                           {"step.json": {"step": step}})
  final_test = validation.test_all(model, config, mesh, is_chief, "final")
  results = {"step": step, "test": final_test, "final_test": final_test,
             "selected": {"model": workdir_lib.EXPORT_DIR, "step": step,
                          "reason": "no validation (train.valid_every=0)"}}
  if best.record is not None:
    best_step = best.record["step"]
    results["best_valid"] = {"step": best_step,
                             "accuracy": best.record["accuracy"]}
    results["selected"] = {"model": workdir_lib.BEST_DIR, "step": best_step,
                           "reason": "best validation accuracy"}
    if best_step != step:
      best_model, _ = export.load_exported_model(best.directory, mesh=mesh)
      results["test"] = validation.test_all(
          best_model, config, mesh, is_chief,
          f"best-validation (step {best_step})")
  writer.write_scalars(step, {
      f"test/{s}/accuracy": r["mean"] for s, r in results["test"].items()}
                       | {f"test_final/{s}/accuracy": r["mean"]
                          for s, r in final_test.items()})
  writer.flush()
  if is_chief:
    print(f"reported: the model of step {results['selected']['step']} "
          f"({results['selected']['reason']})", flush=True)
    (workdir / workdir_lib.RESULTS_FILE).write_text(
        json.dumps(results, indent=2) + "\n")
  return results


def _flatten(config: ml_collections.ConfigDict, prefix: str = ""):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
