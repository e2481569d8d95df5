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
import time
from typing import Any

from absl import logging
from clu import metric_writers
from flax import nnx
import jax
import ml_collections
import numpy as np

from ctx_jax import models
from ctx_jax.eval import evaluate
from ctx_jax.training import checkpoint as checkpoint_lib
from ctx_jax.training import input_pipeline
from ctx_jax.training import mesh as mesh_lib
from ctx_jax.training import optim
from ctx_jax.training import sharded_step
from ctx_jax.training import train_step as step_lib

EXPORT_DIR = "export"
RESULTS_FILE = "results.json"


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


def create_train_state(config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh):
  """Model and optimiser with every array replicated over `mesh`."""

  @nnx.jit
  def create():
    model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer),
                              wrt=nnx.Param)
    # Born replicated on the mesh: every process holds the same values.
    for module in (model, optimizer):
      state = nnx.state(module)
      nnx.update(module, jax.lax.with_sharding_constraint(
          state, mesh_lib.replicated(mesh)))
    return model, optimizer

  with jax.set_mesh(mesh):
    return create()


def init_backbone_from(model: nnx.Module, export_dir: str) -> int:
  """Copies the backbone (not the transformer head) of an export into `model`.

  Mirrors the official warm start, which restores backbone variables and
  their batch-norm EMA statistics but no `tformer_*` variable.

  Returns:
    The number of arrays copied.
  """
  source, _ = checkpoint_lib.load_exported_model(export_dir)
  src = nnx.to_flat_state(nnx.state(source))
  src = {path: var for path, var in src}
  state = nnx.state(model)
  copied = 0
  new_flat = []
  for path, var in nnx.to_flat_state(state):
    is_head = any(str(p).startswith("tformer") for p in path)
    if not is_head and path in src:
      if src[path].value.shape != var.value.shape:
        raise ValueError(f"init_from {export_dir}: {'/'.join(map(str, path))}"
                         f" has shape {src[path].value.shape}, expected "
                         f"{var.value.shape}")
      var = var.replace(src[path].value)
      copied += 1
    new_flat.append((path, var))
  if not copied:
    raise ValueError(f"init_from {export_dir}: no backbone variable matches "
                     "this model (different backbone?)")
  nnx.update(model, nnx.from_flat_state(new_flat))
  return copied


class Progress:
  """Console progress: step, loss, accuracy, episodes/s, images/s, ETA.

  Rates are measured from the first logged step on, so the first step's
  compilation does not distort them.
  """

  def __init__(self, num_steps: int):
    self.num_steps = num_steps
    self.t0 = None
    self.first = 0
    self.images = 0  # Real (unpadded) images seen since the first log.

  def log(self, step: int, metrics: dict[str, float]) -> str:
    now = time.time()
    if self.t0 is None:
      self.t0, self.first, self.images = now, step, 0
      rates, eta = "compiling", "?"
    else:
      elapsed = max(now - self.t0, 1e-9)
      rate = (step - self.first) / elapsed
      rates = (f"{rate:.2f} episodes/s | {self.images / elapsed:.0f} "
               "images/s")
      remaining = (self.num_steps - step) / max(rate, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime(remaining))
    return (f"step {step}/{self.num_steps} | loss {metrics['loss']:.4f} | "
            f"acc {100 * metrics['accuracy']:.1f}% | {rates} | ETA {eta}")


def _check_finite(step: int, metrics: dict[str, float], ckpt_dir) -> None:
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"non-finite training metrics at step {step}: {bad}. Stopping; the "
        f"last good checkpoint is kept in {ckpt_dir}")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains per `config`, writing to `workdir`; returns the test results."""
  workdir = prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  # Fail on missing or malformed data before any compilation.
  for split in ("train", "valid", "test"):
    input_pipeline.load_specs(config.data.records_root,
                              config.data[f"{split}_sources"])
  if is_chief:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

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
    start_step = ckpt.restore(model, optimizer)
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  elif config.init_from:
    n = init_backbone_from(model, config.init_from)
    logging.info("initialised %d backbone arrays from %s", n, config.init_from)

  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(config).items()})

  num_ways = input_pipeline.max_ways(config, "TRAIN")
  wd = float(config.optimizer.weight_decay)
  # A restarted job continues with fresh episodes rather than replaying.
  train_stream = input_pipeline.episodes(
      config, "TRAIN", config.data.train_sources,
      seed=config.seed * 1_000_003 + start_step, pad_multiple=mesh.size,
      process_index=jax.process_index(), process_count=jax.process_count())
  batches = mesh_lib.prefetch_to_mesh(train_stream, mesh,
                                      step_lib.MODEL_INPUT_KEYS)
  schedule = optim.learning_rate_schedule(config.optimizer)
  progress = Progress(config.train.num_steps)
  step = start_step
  with metric_writers.ensure_flushes(writer), jax.set_mesh(mesh):
    model.train()
    while step < config.train.num_steps:
      episode, host = next(batches)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        metrics = train_fn(model, optimizer, episode, num_ways, wd)
      step += 1
      progress.images += int(np.sum(host["support_mask"]) +
                             np.sum(host["query_mask"])) * jax.process_count()
      logging.log_first_n(logging.INFO, "finished step %d", 3, step)
      last = step == config.train.num_steps
      if step % config.train.log_every == 0 or last or step == start_step + 1:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, values, ckpt.directory)
        values["learning_rate"] = float(schedule(step - 1))
        writer.write_scalars(step, values)
        if is_chief:
          print(progress.log(step, values), flush=True)
      if step % config.train.checkpoint_every == 0 or last:
        _check_finite(step, {"loss": float(metrics["total_loss"])},
                      ckpt.directory)
        ckpt.save(step, model, optimizer, force=last)
      if config.train.valid_every and (step % config.train.valid_every == 0
                                       or last):
        valid = {s: evaluate.evaluate_split(model, config, mesh, "VALID", s,
                                   config.train.num_valid_episodes,
                                   seed=config.eval.seed)
                 for s in config.data.valid_sources}
        writer.write_scalars(step, {f"valid/{s}/accuracy": v.mean
                                    for s, v in valid.items()})
        if is_chief:
          print(f"step {step} validation: " + ", ".join(
              f"{s} {v}" for s, v in valid.items()), flush=True)
  # Drop the tf.data iterators now: TF 2.21 can hang at interpreter exit
  # while a generator-backed iterator is still alive.
  batches.close()
  train_stream.close()
  ckpt.wait_until_finished()
  ckpt.close()

  export_dir = workdir / EXPORT_DIR
  if is_chief and not (export_dir / checkpoint_lib.MODEL_CONFIG_FILE).exists():
    checkpoint_lib.export_model(export_dir, model, config.model)
  results = {"step": step, "test": {}}
  for source in config.data.test_sources:
    summary = evaluate.evaluate_split(model, config, mesh, "TEST", source,
                             config.eval.num_episodes, seed=config.eval.seed)
    results["test"][source] = summary.as_dict()
    writer.write_scalars(step, {f"test/{source}/accuracy": summary.mean})
    if is_chief:
      print(f"test {source}: {summary} over {summary.num_episodes} episodes",
            flush=True)
  if is_chief:
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
  return results


def _flatten(config: ml_collections.ConfigDict, prefix: str = ""):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
