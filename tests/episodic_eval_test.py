"""Episodic evaluation: the official 95% CI, and the pixel baseline."""

import math

import numpy as np
import pytest

from ctx_jax.eval import baselines
from ctx_jax.eval import episodic
from ctx_jax.eval import report as eval_report


def test_ci_formula_matches_official():
  acc = [0.5, 0.7, 0.9, 0.6]
  s = episodic.summarize(acc)
  assert s.mean == pytest.approx(0.675)
  # population std (ddof=0), 1.96 / sqrt(n)
  std = math.sqrt(sum((a - 0.675) ** 2 for a in acc) / 4)
  assert s.ci95 == pytest.approx(1.96 * std / 2)
  assert s.num_episodes == 4


def test_summarize_rejects_empty():
  with pytest.raises(ValueError, match="no episodes"):
    episodic.summarize([])


def test_evaluate_episodes_reports_short_stream():
  with pytest.raises(ValueError, match="ended after 2 of 3"):
    episodic.evaluate_episodes(lambda e: {"accuracy": 1.0}, iter([{}, {}]), 3)


def test_pixel_nn_ignores_padding():
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(3, 4, 4, 3))
  support = np.concatenate([protos, np.full((2, 4, 4, 3), 0.0)])
  query = np.concatenate([protos[[2, 0, 1]] + 0.01,
                          protos[[0]] + 0.01])  # last row is padding
  episode = {
      "support_images": support, "support_labels": np.array([0, 1, 2, 0, 0]),
      "support_mask": np.array([1, 1, 1, 0, 0], bool),
      "query_images": query, "query_labels": np.array([2, 0, 1, 2]),
      "query_mask": np.array([1, 1, 1, 0], bool),
  }
  assert baselines.pixel_nearest_neighbour(episode)["accuracy"] == 1.0
  episode["query_labels"] = np.array([2, 0, 0, 2])
  assert baselines.pixel_nearest_neighbour(episode)["accuracy"] == (
      pytest.approx(2 / 3))


def test_format_table_marks_failed_sources():
  table = eval_report.format_table({
      "omniglot": {"mean": 0.8, "ci95": 0.01, "num_episodes": 10},
      "dtd": {"error": "records of source 'dtd' not found"},
      "aircraft": {"mean": 0.6, "ci95": 0.02, "num_episodes": 10}})
  assert "FAILED: records of source 'dtd' not found" in table
  assert "average" in table and "70.00%" in table
