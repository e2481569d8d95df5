"""Training checkpoints, `<workdir>/ckpt/<step>/`, through orbax.

An orbax `CheckpointManager` writes the model state, the optimizer state, the
step and the data position (`state/` and `data/`). Resume picks the latest
*finalized* step: orbax writes into a temporary directory and renames it when
complete, so a checkpoint interrupted half-way (a killed job) is never picked
up. States are stored as pure nested dicts of arrays, as exports are.
"""

import os
from typing import Any

from flax import nnx
import orbax.checkpoint as ocp

from ctx_jax import paths
from ctx_jax.checkpoints import export


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
    self.directory = paths.resolve(workdir) / "ckpt"
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
    target = {"model": export.abstract_pure_state(model),
              "optimizer": export.abstract_pure_state(optimizer)}
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
