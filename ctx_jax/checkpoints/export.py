"""Exported models: writing, swapping and loading them.

An export is `<dir>/model_config.json` + `<dir>/state/`: just the model
state (parameters and batch-norm EMA statistics) and the model config needed
to rebuild it. `ctx-import-official` writes this format, `ctx-eval` and
`init_from` read it, and training exports its final and best models to it
(`export_atomically`, so a crash never leaves a half-written export).

States are stored as pure nested dicts of arrays (`nnx.to_pure_dict`) so the
files do not depend on flax's internal Variable classes.
"""

import json
import os
from typing import Any

from etils import epath
from flax import nnx
import jax
import ml_collections
import orbax.checkpoint as ocp

from ctx_jax import paths
from ctx_jax import models

MODEL_CONFIG_FILE = "model_config.json"
STATE_DIR = "state"


def abstract_pure_state(module: nnx.Module) -> dict[str, Any]:
  """Pure-dict pytree of ShapeDtypeStructs (with shardings) for `module`."""
  pure = nnx.to_pure_dict(nnx.state(module))
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)


def export_model(directory: str | os.PathLike[str], model: nnx.Module,
                 model_config: ml_collections.ConfigDict) -> epath.Path:
  """Writes `model`'s state and config to `directory` (must not exist).

  Args:
    directory: destination folder; created. An existing non-empty folder is an
      error, so an earlier export is never overwritten.
    model: the model whose `nnx.state` (params + batch stats) is saved.
    model_config: the ConfigDict `models.build_model` was called with.

  Returns:
    The absolute path of the export.
  """
  directory = paths.resolve(directory)
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(
        f"export directory {directory} exists and is not empty; choose a new "
        "one so that nothing already written is overwritten")
  # Every process takes part in the save (orbax is collective); they must
  # all have checked the folder before any of them writes into it.
  sync("ctx_jax_export_check")
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
  sync("ctx_jax_export_done")
  return directory


def sync(name: str) -> None:
  """Barrier over all processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load_model_config(directory: str | os.PathLike[str]
                      ) -> ml_collections.ConfigDict:
  """Reads the model config of an export, with a clear error if absent."""
  path = paths.resolve(directory) / MODEL_CONFIG_FILE
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
  directory = paths.resolve(directory)
  target = abstract_pure_state(model)
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


def export_atomically(directory: epath.Path, model: nnx.Module,
                      model_config, extra: dict[str, Any] | None = None
                      ) -> None:
  """Writes an export to `directory`, replacing any earlier one atomically.

  The new export is written beside the old one and renamed over it, so a
  crash leaves either the old or the new export, never a mix (a leftover
  `<name>.old` is put back by `recover_export`). On an object store a
  folder rename is a copy of its objects, not atomic, but the same recovery
  applies: `<name>.old` is deleted only once `<name>` is complete.

  Args:
    directory: the export folder.
    model: the model to export.
    model_config: its config.
    extra: `{file name: JSON-able}` written into the export before it
      becomes visible.
  """
  directory = paths.resolve(directory)
  tmp = directory.parent / f"{directory.name}.tmp"
  old = directory.parent / f"{directory.name}.old"
  if jax.process_index() == 0 and tmp.exists():
    tmp.rmtree()
  export_model(tmp, model, model_config)
  if jax.process_index() == 0:
    for name, value in (extra or {}).items():
      (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    if directory.exists():
      directory.rename(old)
    tmp.rename(directory)
    if old.exists():
      old.rmtree()
  sync("ctx_jax_export_swap")


def recover_export(directory: epath.Path) -> None:
  """Undoes a swap of `export_atomically` interrupted between its renames."""
  directory = paths.resolve(directory)
  old = directory.parent / f"{directory.name}.old"
  if jax.process_index() == 0 and old.exists():
    if directory.exists():
      old.rmtree()
    else:
      old.rename(directory)
  sync("ctx_jax_export_recover")
