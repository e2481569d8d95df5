"""Model selection as the official: the reported test figure is the best
validation checkpoint's, with its step; the final model's is kept beside it."""

import json

from flax import nnx
import jax
import numpy as np

from ctx_jax import mesh as mesh_lib
from ctx_jax.checkpoints import export
from ctx_jax.eval import episodic
from ctx_jax.eval import evaluate
from ctx_jax.training import train
from ctx_jax.training import workdir as workdir_lib
from experiments import demo
from tests import fakes


def _params(export_dir):
  model, _ = export.load_exported_model(export_dir)
  return nnx.to_pure_dict(jax.device_get(nnx.state(model, nnx.Param)))


def test_results_report_the_best_validation_checkpoint(tmp_path, monkeypatch):
  data = fakes.make_tiny_demo(tmp_path / "data")
  config = demo.get_config("smoke")
  config.model.query_dim = config.model.val_dim = 16
  config.data.records_root = str(data.parent)
  config.num_devices = 1
  config.train.num_steps = 4
  config.train.valid_every = 2   # Validation at steps 2 and 4.
  config.train.checkpoint_every = 2
  config.optimizer.learning_rate = 0.05  # Steps change the model a lot.

  # Validation says step 2 is best and step 4 worse, so the best is not the
  # last: everything else (training, exports, test evaluation) is real.
  valid_means = iter([0.9, 0.1])
  real_evaluate_split = evaluate.evaluate_split
  validated = []

  def evaluate_split(model, cfg, mesh, split, source, num_episodes, seed):
    if split == "VALID":
      validated.append(source)
      mean = next(valid_means)
      return episodic.summarize([mean] * num_episodes)
    return real_evaluate_split(model, cfg, mesh, split, source, num_episodes,
                               seed=seed)

  monkeypatch.setattr(evaluate, "evaluate_split", evaluate_split)
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()

  assert validated == ["glyphs", "glyphs"]
  assert results["step"] == 4
  assert results["selected"] == {"model": "best", "step": 2,
                                 "reason": "best validation accuracy"}
  assert results["best_valid"] == {"step": 2, "accuracy": 0.9}
  assert json.loads((workdir / workdir_lib.RESULTS_FILE).read_text()) == results
  assert json.loads((workdir / "best" / workdir_lib.BEST_FILE).read_text())[
      "step"] == 2

  # best/ holds the step-2 model, export/ the step-4 one: they differ.
  best, final = _params(workdir / "best"), _params(workdir / "export")
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(a - b))), best, final))
  assert max(diffs) > 1e-3

  # The reported figure is the best model's test accuracy on the test
  # episodes, the final one the final model's: re-evaluate both independently.
  mesh = mesh_lib.make_mesh(1)
  for name, key in (("best", "test"), ("export", "final_test")):
    model, _ = export.load_exported_model(workdir / name, mesh=mesh)
    summary = evaluate.evaluate_split(model, config, mesh, "TEST", "glyphs",
                                      config.eval.num_episodes,
                                      seed=config.eval.seed)
    assert results[key]["glyphs"] == summary.as_dict(), name
