"""The work dir of a run and what training leaves in it.

  <workdir>/config.json     the run's config
  <workdir>/ckpt/<step>/    training checkpoints (checkpoints/train_state.py)
  <workdir>/best/           export of the best model on validation, with
                            best/valid.json (its step and accuracies)
  <workdir>/export/         export of the final model, with export/step.json
  <workdir>/results.json    test figures (of the best-validation model)
  <workdir>/events.*        TensorBoard summaries (clu metric writers)
"""

import json
import math
import os

from etils import epath
from flax import nnx

from ctx_jax import paths
from ctx_jax.checkpoints import export

EXPORT_DIR = "export"
BEST_DIR = "best"
BEST_FILE = "valid.json"  # Inside BEST_DIR: step and validation accuracy.
RESULTS_FILE = "results.json"


def prepare_workdir(workdir: str) -> epath.Path:
  """Creates `workdir` (local or e.g. `gs://`) and checks it is writable."""
  path = paths.resolve(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # OSError locally; tf.errors.OpError (not an OSError) on gs:// and co.
    raise PermissionError(f"work dir {path} is not writable: "
                          f"{type(e).__name__}: {e}") from e
  return path


class BestExport:
  """Keeps `<workdir>/best`: an export of the best model on validation.

  `best/valid.json` records its step and validation accuracies; a resumed
  run reads it, so "best" spans the whole run.
  """

  def __init__(self, workdir: epath.Path):
    self.directory = workdir / BEST_DIR
    export.recover_export(self.directory)
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
    export.export_atomically(self.directory, model, model_config, {BEST_FILE: record})
    self.record = record
    return True
