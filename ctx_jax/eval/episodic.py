"""Episodic evaluation: mean query accuracy over episodes with a 95% CI.

The interval follows the official Meta-Dataset evaluation: `1.96 * std / sqrt(
n)` over per-episode accuracies, with the population standard deviation
(`np.std`, ddof=0), as `meta_dataset/trainer.py` (`Trainer.evaluate`) and
`meta_dataset/analyze.py` compute it. The CTX paper's tables use that code.
"""

import dataclasses
import math
import time
from typing import Callable, Iterable, Mapping, Sequence

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


def episode_accuracies(step_fn: Callable[[Mapping], Mapping],
                       episodes: Iterable[Mapping], num_episodes: int,
                       chunk_size: int = 0,
                       on_chunk: Callable[[Sequence[float]], None] | None = None
                       ) -> list[float]:
  """Per-episode accuracies of `step_fn` on `num_episodes` episodes.

  Args:
    step_fn: maps an episode to metrics holding a scalar `accuracy` (a device
      array is fine: results are fetched once per chunk, so dispatch is not
      blocked per episode).
    episodes: iterator of episodes (at least `num_episodes`).
    num_episodes: how many to evaluate.
    chunk_size: results are fetched and handed to `on_chunk` every
      `chunk_size` episodes (0: once, at the end).
    on_chunk: called with the accuracies of each finished chunk, in order.

  Returns:
    The `num_episodes` accuracies, in episode order.
  """
  chunk_size = chunk_size if chunk_size > 0 else max(num_episodes, 1)
  done, pending = [], []
  iterator = iter(episodes)

  def flush():
    values = [float(a) for a in pending]
    pending.clear()
    done.extend(values)
    if on_chunk is not None and values:
      on_chunk(values)

  for i in range(num_episodes):
    try:
      episode = next(iterator)
    except StopIteration:
      flush()
      raise ValueError(f"episode stream ended after {i} of {num_episodes} "
                       "episodes") from None
    pending.append(step_fn(episode)["accuracy"])
    if len(pending) == chunk_size:
      flush()
  flush()
  return done


class RateLogger:
  """`name: done/total episodes | rate | ETA` lines for a long evaluation.

  The rate is measured from the first report on (the first chunk includes
  compilation), over the episodes run in this process (not resumed ones).
  """

  def __init__(self, name: str, total: int, start: int = 0,
               log: Callable[[str], None] = print):
    self.name, self.total, self.log = name, total, log
    self.t0, self.first = None, start

  def __call__(self, done: int) -> None:
    now = time.time()
    if self.t0 is None:
      self.t0, self.first = now, done
      rate = "compiling"
      eta = "?"
    else:
      per_s = (done - self.first) / max(now - self.t0, 1e-9)
      rate = f"{per_s:.2f} episodes/s"
      eta = time.strftime("%H:%M:%S", time.gmtime(
          (self.total - done) / max(per_s, 1e-9)))
    self.log(f"{self.name}: {done}/{self.total} episodes | {rate} | "
             f"ETA {eta}")


def evaluate_episodes(step_fn: Callable[[Mapping], Mapping],
                      episodes: Iterable[Mapping],
                      num_episodes: int) -> AccuracySummary:
  """Runs `step_fn` on `num_episodes` episodes and summarises accuracy."""
  return summarize(episode_accuracies(step_fn, episodes, num_episodes))
