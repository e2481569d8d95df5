"""Validation during training and the final test, through the eval library.

Model selection as the official trainer: the selection metric is the mean,
over the valid sources, of their mean episode accuracy; the best model so far
is exported to `<workdir>/best` (`workdir.BestExport`).
"""

from typing import Any

import numpy as np

from ctx_jax.eval import evaluate
from ctx_jax.eval import figures


def test_all(model, config, mesh, is_chief, label: str) -> dict[str, Any]:
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


def validate(config, model, mesh, step, writer, best, is_chief) -> None:
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
