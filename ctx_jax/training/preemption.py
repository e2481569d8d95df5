"""Stopping cleanly on SIGTERM: checkpoint at the current step, then exit.

`PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM) is what `ctx-train` exits with,
as if the signal had killed it; running the same command again resumes.
"""

import signal
import threading

import jax

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as if the signal had killed us.


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint."""

  def __init__(self, step: int, ckpt_dir):
    super().__init__(
        f"preempted (SIGTERM) at step {step}; checkpoint saved in {ckpt_dir}. "
        "Run the same command again to resume.")
    self.step = step


class PreemptionWatcher:
  """Notices SIGTERM so the loop can checkpoint and stop cleanly.

  Single process: a SIGTERM handler sets a flag, read after every step. Multi
  process: JAX's preemption service (started by `jax.distributed`) catches
  the signal and orbax's `reached_preemption` makes every process stop at the
  same step; installing a Python handler there would disable it.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._flag.set()

  def should_stop(self, step: int, ckpt) -> bool:
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
