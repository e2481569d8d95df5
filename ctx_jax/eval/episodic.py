"""Episodic evaluation: mean query accuracy over episodes with a 95% CI.

The interval follows the official Meta-Dataset evaluation: `1.96 * std / sqrt(
n)` over per-episode accuracies, with the population standard deviation
(numpy's default, ddof=0), as `learn/trainer.py` reports it.
"""

import dataclasses
import math
from typing import Callable, Iterable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class AccuracySummary:
  """Mean accuracy over episodes and its 95% confidence half-width."""
  mean: float
  ci95: float
  num_episodes: int

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f}%"


def summarize(accuracies: Iterable[float]) -> AccuracySummary:
  """Mean and official 95% CI of per-episode accuracies."""
  acc = np.asarray(list(accuracies), dtype=np.float64)
  if acc.size == 0:
    raise ValueError("no episodes to summarize")
  ci = 1.96 * float(np.std(acc)) / math.sqrt(acc.size)
  return AccuracySummary(mean=float(np.mean(acc)), ci95=ci,
                         num_episodes=int(acc.size))


def evaluate_episodes(step_fn: Callable[[Mapping], Mapping],
                      episodes: Iterable[Mapping],
                      num_episodes: int,
                      progress: Callable[[int, int], None] | None = None
                      ) -> AccuracySummary:
  """Runs `step_fn` on `num_episodes` episodes and summarises accuracy.

  Args:
    step_fn: maps an episode to metrics holding a scalar `accuracy` (a device
      array is fine; results are fetched in one go at the end so dispatch is
      not blocked per episode).
    episodes: iterator of episodes (at least `num_episodes`).
    num_episodes: how many to evaluate.
    progress: optional callback `(done, total)`.

  Returns:
    The accuracy summary.
  """
  pending = []
  iterator = iter(episodes)
  for i in range(num_episodes):
    try:
      episode = next(iterator)
    except StopIteration:
      raise ValueError(f"episode stream ended after {i} of {num_episodes} "
                       "episodes") from None
    pending.append(step_fn(episode)["accuracy"])
    if progress is not None:
      progress(i + 1, num_episodes)
  return summarize(float(a) for a in pending)
