"""Checkpoints: the only module that imports orbax.

Two formats live here:

* Training checkpoints, `<workdir>/ckpt/<step>/`, written by an orbax
  `CheckpointManager`: model state, optimizer state, the step, and the data
  position (`state/` and `data/`). Resume picks the latest *finalized* step;
  orbax writes into a temporary directory and renames it when complete, so a
  checkpoint interrupted half-way (a killed job) is never picked up.
* Exported models, `<dir>/model_config.json` + `<dir>/state/`: just the model
  state (parameters and batch-norm EMA statistics) and the model config needed
  to rebuild it. `ctx-import-official` writes this format, `ctx-eval` and
  `init_from` read it, and training can export its final model to it.

States are stored as pure nested dicts of arrays (`nnx.to_pure_dict`) so the
files do not depend on flax's internal Variable classes.
"""

import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import ml_collections
import orbax.checkpoint as ocp

MODEL_CONFIG_FILE = "model_config.json"
STATE_DIR = "state"


def _abstract_pure_state(module: nnx.Module) -> dict[str, Any]:
  """Pure-dict pytree of ShapeDtypeStructs (with shardings) for `module`."""
  pure = nnx.to_pure_dict(nnx.state(module))
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)


def export_model(directory: str | os.PathLike[str], model: nnx.Module,
                 model_config: ml_collections.ConfigDict) -> pathlib.Path:
  """Writes `model`'s state and config to `directory` (must not exist).

  Args:
    directory: destination folder; created. An existing non-empty folder is an
      error, so an earlier export is never overwritten.
    model: the model whose `nnx.state` (params + batch stats) is saved.
    model_config: the ConfigDict `models.build_model` was called with.

  Returns:
    The absolute path of the export.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(
        f"export directory {directory} exists and is not empty; choose a new "
        "one so that nothing already written is overwritten")
  # Every process takes part in the save (orbax is collective); they must
  # all have checked the folder before any of them writes into it.
  _sync("ctx_jax_export_check")
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / STATE_DIR,
                    nnx.to_pure_dict(nnx.state(model)))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    # The config goes last: its presence marks a complete export.
    tmp = directory / (MODEL_CONFIG_FILE + ".tmp")
    tmp.write_text(model_config.to_json_best_effort(indent=2) + "\n")
    tmp.rename(directory / MODEL_CONFIG_FILE)
  _sync("ctx_jax_export_done")
  return directory


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load_model_config(directory: str | os.PathLike[str]
                      ) -> ml_collections.ConfigDict:
  """Reads the model config of an export, with a clear error if absent."""
  path = pathlib.Path(directory) / MODEL_CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: {directory} is not a complete exported model "
        "(written by ctx-import-official or ctx-train)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_model_state(directory: str | os.PathLike[str],
                        model: nnx.Module,
                        sharding: jax.sharding.Sharding | None = None
                        ) -> None:
  """Loads an export's state into an already built `model`, in place.

  Args:
    directory: an export.
    model: a model of the export's config (real or abstract).
    sharding: where every restored array goes (e.g. replicated over a mesh,
      which is what a multi-process run needs: the export's own sharding
      names devices of the process that wrote it). Default: the model's
      current shardings, or the export's for an abstract model.
  """
  directory = pathlib.Path(directory).absolute()
  target = _abstract_pure_state(model)
  if sharding is not None:
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        target)
  restored = ocp.StandardCheckpointer().restore(directory / STATE_DIR, target)
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)


def load_exported_model(directory: str | os.PathLike[str],
                        rngs: nnx.Rngs | None = None,
                        mesh: jax.sharding.Mesh | None = None):
  """Rebuilds a model from an export.

  Args:
    directory: a folder written by `export_model`.
    rngs: RNGs of the (never materialised) initial parameters.
    mesh: if given, every array is restored replicated over this mesh (works
      across processes); otherwise as the export was saved.

  Returns:
    `(model, model_config)`.
  """
  from ctx_jax import models  # pylint: disable=g-import-not-at-top
  model_config = load_model_config(directory)
  # Shapes only: a random init of the real model would be thrown away (and
  # costs tens of seconds on a CPU for ResNet-34).
  model = nnx.eval_shape(
      lambda: models.build_model(model_config, rngs=rngs or nnx.Rngs(0)))
  sharding = None
  if mesh is not None:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  restore_model_state(directory, model, sharding)
  return model, model_config



def load_exported_model_or_explain(directory: str | os.PathLike[str],
                                   mesh=None):
  """`load_exported_model`, any failure as one clear error naming the export.

  A missing folder or `model_config.json` stays a FileNotFoundError; a
  truncated or foreign `state/` (orbax raises many kinds of errors) becomes
  a ValueError that names the folder.
  """
  try:
    return load_exported_model(directory, mesh=mesh)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split())[:300] or type(e).__name__
    raise ValueError(f"cannot load the exported model in {directory} "
                     f"({type(e).__name__}: {message})") from e

class TrainCheckpointer:
  """Periodic, resumable training checkpoints in `<workdir>/ckpt`.

  Wraps `ocp.CheckpointManager`: `save` may be called every step and only
  writes every `save_every` steps (or when forced, e.g. at the end or on
  preemption); the last `max_to_keep` are kept. Each checkpoint holds the
  model and optimizer states (`state`) and a small JSON record (`data`) of
  what is needed to continue the run exactly: the seed and how many
  training episodes were consumed.
  """

  def __init__(self, workdir: str | os.PathLike[str], save_every: int,
               max_to_keep: int = 3):
    self.directory = pathlib.Path(workdir).absolute() / "ckpt"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_every), max_to_keep=max_to_keep,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
           data: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves if the policy (or `force`) says so; returns whether it did.

    Args:
      step: the number of optimisation steps done.
      model: saved with its batch-norm statistics.
      optimizer: its full state (moments, count).
      data: JSON-able record of the input position (e.g. `{"seed": 0,
        "episodes": step}`).
      force: save regardless of the interval.
    """
    items = {
        "model": nnx.to_pure_dict(nnx.state(model)),
        "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
    }
    args = ocp.args.Composite(state=ocp.args.StandardSave(items),
                              data=ocp.args.JsonSave(dict(data or {})))
    return self._manager.save(step, args=args, force=force)

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes agreed to stop at `step` (multi-host SIGTERM)."""
    return self._manager.reached_preemption(step)

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer,
              step: int | None = None) -> tuple[int, dict[str, Any]]:
    """Restores `step` (default: latest) into `model`/`optimizer` in place.

    Returns:
      `(step, data)`: the restored step and the `data` record saved with it.
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = {"model": _abstract_pure_state(model),
              "optimizer": _abstract_pure_state(optimizer)}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(
          f"checkpoint {self.directory / str(step)} does not match this "
          f"model and optimizer (a different config?): {e}") from e
    for module, key in ((model, "model"), (optimizer, "optimizer")):
      state = nnx.state(module)
      nnx.replace_by_pure_dict(state, restored.state[key])
      nnx.update(module, state)
    return step, dict(restored.data or {})

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
