"""Training progress: clu's `ReportProgress` plus the console line.

`ReportProgress` (clu periodic actions) writes `steps_per_sec` and `uptime` to
the metric writer and the ETA to the work unit's notes every `every_steps`
steps and at the last step; `Progress` also returns the console line of each
report: step, loss, accuracy, episodes/s, images/s and ETA.

Time spent in `paused(...)` blocks (validation, exports) is left out of the
rates, so they measure training alone; the share of each part is still in
clu's notes.
"""

import contextlib
import time

from clu import metric_writers
from clu import periodic_actions


class Progress(periodic_actions.ReportProgress):
  """Reports every `every_steps` steps; `__call__(step)` says when it did."""

  def __init__(self, num_steps: int, every_steps: int,
               writer: metric_writers.MetricWriter | None = None):
    super().__init__(num_train_steps=num_steps, writer=writer,
                     every_steps=every_steps, every_secs=None)
    self.num_steps = num_steps
    self.images = 0  # Real (unpadded) images seen since the last report.
    self.rates = {}  # Of the last report: episodes_per_sec, images_per_sec.
    self._paused = 0.0

  @contextlib.contextmanager
  def paused(self, name: str):
    """Times a block under `name` and leaves it out of the rates."""
    start = time.monotonic()
    with self.timed(name, wait_jax_async_dispatch=False):
      yield
    self._paused += time.monotonic() - start

  def _apply(self, step: int, t: float):
    super()._apply(step, t)
    elapsed = max(t - self._previous_time - self._paused, 1e-9)
    self.rates = {"episodes_per_sec": (step - self._previous_step) / elapsed,
                  "images_per_sec": self.images / elapsed}
    self.images, self._paused = 0, 0.0

  def __call__(self, step: int, t: float | None = None) -> bool:
    if self._previous_step is None:  # The first call only starts the clock.
      self.images, self._paused = 0, 0.0
    return super().__call__(step, t)

  def line(self, step: int, metrics: dict[str, float],
           reported: bool) -> str:
    """The console line; rates and ETA of this report if there was one."""
    if not reported:
      rates, eta = "compiling", "?"
    else:
      rate = self.rates["episodes_per_sec"]
      rates = (f"{rate:.2f} episodes/s | "
               f"{self.rates['images_per_sec']:.0f} images/s")
      remaining = (self.num_steps - step) / max(rate, 1e-9)
      eta = time.strftime("%H:%M:%S", time.gmtime(remaining))
    return (f"step {step}/{self.num_steps} | loss {metrics['loss']:.4f} | "
            f"acc {100 * metrics['accuracy']:.1f}% | {rates} | ETA {eta}")
