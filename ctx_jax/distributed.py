"""Multi-process start-up shared by `ctx-train` and `ctx-eval`.

`--distributed` (or env CTX_JAX_DISTRIBUTED=1, as the launchers in `launch/`
set it) makes the program call `jax.distributed.initialize` before any device
is touched, with cluster auto-detection (Cloud TPU, SLURM, ...) or the
explicit `--coordinator_address/--num_processes/--process_id`. A failure to
initialise is an error, never a silent fallback to a single process.
"""

import contextlib
import os
import re
import sys
import threading
import time
import traceback

from absl import flags

DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("CTX_JAX_DISTRIBUTED") == "1",
    "Call jax.distributed.initialize() first (multi-process runs; default: "
    "env CTX_JAX_DISTRIBUTED=1).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("CTX_JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 (optional; default: env "
    "CTX_JAX_COORDINATOR_ADDRESS, else auto-detected).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Number of processes (optional; default: env CTX_JAX_NUM_PROCESSES, "
    "else auto-detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (optional; default: env "
    "CTX_JAX_PROCESS_ID, else auto-detected).")
LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Local accelerator ids this process uses "
    "(optional; default: env CTX_JAX_LOCAL_DEVICE_IDS). Under SLURM, JAX "
    "otherwise gives each task only GPU $SLURM_LOCALID, which is right for "
    "one task per GPU; one task per node must list all its GPUs.")


def _from_env(value, name):
  if value is not None:
    return value
  text = os.environ.get(name)
  return int(text) if text else None


def initialize_kwargs() -> dict[str, object]:
  """The explicit `jax.distributed.initialize` arguments (flags, then env)."""
  values = (("coordinator_address", COORDINATOR.value),
            ("num_processes", _from_env(NUM_PROCESSES.value,
                                        "CTX_JAX_NUM_PROCESSES")),
            ("process_id", _from_env(PROCESS_ID.value, "CTX_JAX_PROCESS_ID")))
  ids = LOCAL_DEVICE_IDS.value
  if ids is None and os.environ.get("CTX_JAX_LOCAL_DEVICE_IDS"):
    ids = os.environ["CTX_JAX_LOCAL_DEVICE_IDS"].split(",")
  if ids:
    values += (("local_device_ids", [int(i) for i in ids]),)
  return {k: v for k, v in values if v is not None}


def maybe_initialize() -> bool:
  """Initialises multi-process JAX if `--distributed`; returns whether."""
  if not DISTRIBUTED.value:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on the CPU backend need an implementation
  # (gloo ships with jaxlib). It is JAX 0.10's default; set it explicitly so a
  # CPU-only multi-process run never depends on that default. It does not
  # affect GPU or TPU backends.
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**initialize_kwargs())
  return True


# ---------------------------------------------------------------------------
# Failing together (issue 22). A process that fails publishes its one-line
# error in the key-value store of JAX's coordination service (started by
# `jax.distributed.initialize`, held by process 0); a watchdog thread in every
# process polls that key and, when another process has failed, prints the
# same line and exits 1 at once, even while the main thread waits in a
# collective the failed process will never join. Without it the others wait
# until JAX's heartbeat timeout (~80 s) and abort with a crash dump.

ERROR_KEY = "ctx_jax/fatal_error"
_ACK_DIR = "ctx_jax/fatal_ack/"
POLL_S = 1.0
# How long a failed process waits for the others to read its error before it
# exits (process 0 holds the store: leaving early would hide the message).
LINGER_S = 20.0


def _client():
  """The coordination service client, or None in a single-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  if jax.process_count() < 2:
    return None
  return jax_distributed.global_state.client


def _exit_now(status: int) -> None:
  """Exits without atexit handlers (JAX's shutdown barrier would wait for
  the failed process, TF's iterators can hang)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(status)  # pylint: disable=protected-access


class FailTogether:
  """Makes every process of a multi-process run stop on one's failure.

  `start()` starts the watchdog; `fail(prog, message)` publishes this
  process's error (the first published error wins), prints
  `<prog>: error: process <i>: <message>` and exits 1 once the others have
  read it (at most `LINGER_S`). Every process prints the same line. A no-op
  in single-process runs.
  """

  def __init__(self, prog: str, poll_s: float = POLL_S,
               linger_s: float = LINGER_S):
    self.prog = prog
    self.poll_s = poll_s
    self.linger_s = linger_s
    self.client = None
    self._stop = threading.Event()
    self._thread = None

  def start(self) -> "FailTogether":
    self.client = _client()
    if self.client is not None and self._thread is None:
      self._thread = threading.Thread(target=self._watch, daemon=True,
                                      name="ctx-jax-fail-together")
      self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()

  def _line(self, message: str) -> str:
    return f"{self.prog}: error: {message}"

  def _watch(self) -> None:
    failures = 0
    while not self._stop.wait(self.poll_s):
      try:
        message = self.client.key_value_try_get(ERROR_KEY)
      except Exception as e:  # pylint: disable=broad-except
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
          failures = 0
          continue
        # The store itself is gone: process 0 died without a word.
        failures += 1
        if failures < 5:
          continue
        message = (f"lost the coordination service held by process 0 "
                   f"({' '.join(str(e).split())[:200]}); another process "
                   "has failed")
      if self._stop.is_set():
        return
      print(self._line(message), file=sys.stderr, flush=True)
      self._leave()

  def _ack(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    try:
      self.client.key_value_set(f"{_ACK_DIR}{jax.process_index()}", "1",
                                 allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  def fail(self, message: str) -> None:
    """Publishes and prints this process's error; exits 1 (no return)."""
    import jax  # pylint: disable=g-import-not-at-top
    self._stop.set()
    me = jax.process_index()
    message = f"process {me}: {message}"
    client = self.client or _client()
    if client is None:
      print(self._line(message), file=sys.stderr, flush=True)
      _exit_now(1)
    try:
      client.key_value_set(ERROR_KEY, message)
    except Exception:  # pylint: disable=broad-except
      try:  # Another process failed first: print its error, as everyone.
        message = client.key_value_try_get(ERROR_KEY)
      except Exception:  # pylint: disable=broad-except
        pass
    print(self._line(message), file=sys.stderr, flush=True)
    self.client = client
    self._leave()

  def _leave(self) -> None:
    """Acknowledges the error and exits 1: processes 1..n at once, process
    0 (which holds the coordination service; the others abort when it goes)
    once all have acknowledged, or after `linger_s`."""
    import jax  # pylint: disable=g-import-not-at-top
    self._ack()
    if jax.process_index() != 0:
      _exit_now(1)
    deadline = time.monotonic() + self.linger_s
    while time.monotonic() < deadline:
      try:
        if len(self.client.key_value_dir_get(_ACK_DIR)
               ) >= jax.process_count():
          break
      except Exception:  # pylint: disable=broad-except
        break
      time.sleep(0.2)
    time.sleep(1.0)  # Let the others finish exiting.
    _exit_now(1)


def error_message(e: BaseException) -> str:
  """One line naming what failed (the file and record for record errors)."""
  from meta_dataset_pipeline import cli  # pylint: disable=g-import-not-at-top
  message = getattr(e, "message", None)
  if isinstance(message, str):
    # An error raised in the pipeline's generator reaches us as a TF error
    # wrapping the Python traceback: its last exception line says it all
    # (e.g. "RecordError: <file>: record 10 (byte 9060) of class 0 is
    # corrupt: data CRC mismatch").
    found = _EMBEDDED.findall(message)
    if found:
      return " ".join(found[-1].split())
  text = cli.one_line(e)
  return text if cli.is_user_error(e) else f"{type(e).__name__}: {text}"


_EMBEDDED = re.compile(r"^(?:[\w.]+\.)?\w+(?:Error|Exception): (.+)$",
                       re.MULTILINE)


_ACTIVE = []  # The FailTogether of the running `fail_together` block.


@contextlib.contextmanager
def fail_together(prog: str, verbose: bool = False,
                  passthrough: tuple[type[BaseException], ...] = ()):
  """Runs the block; any exception in a multi-process run stops all.

  In a single-process run (or for `passthrough` exceptions, e.g. a
  preemption every process handles itself) exceptions propagate unchanged.
  """
  guard = FailTogether(prog).start()
  _ACTIVE.append((guard, verbose, passthrough))
  try:
    yield guard
  except Exception as e:  # pylint: disable=broad-except
    fail_now(e)
    raise
  finally:
    _ACTIVE.remove((guard, verbose, passthrough))
    guard.close()


def fail_now(e: BaseException) -> None:
  """Inside `fail_together` in a multi-process run: publishes `e` and exits
  1 at once (e.g. before cleanup that could wait for the other processes);
  otherwise returns (the caller re-raises)."""
  if not _ACTIVE:
    return
  guard, verbose, passthrough = _ACTIVE[-1]
  if isinstance(e, passthrough) or guard.client is None:
    return
  if verbose:
    traceback.print_exception(e)
  guard.fail(error_message(e))


# ---------------------------------------------------------------------------
# Agreement checks: before the global array of an episode is built, every
# `every` episodes (and the first), all processes compare what they are about
# to feed: episode index, seed, padded support and query sizes, ways and
# source. Through the key-value store (no compiled program): each process
# writes its summary and reads the others'.

AGREE_EVERY = 100
_AGREE_DIR = "ctx_jax/agree/"
# Processes may reach the first episode minutes apart (restoring a checkpoint
# from a bucket); a process that died is caught by the watchdog instead.
AGREE_TIMEOUT_MS = 600_000
_STREAMS = {}


def episode_summary(index: int, seed: int, episode: dict,
                    process_count: int) -> str:
  """What every process must agree on for episode `index` (global sizes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = lambda key: int(np.shape(episode[key])[0]) * process_count
  extra = " ".join(f"{k}={int(np.asarray(episode[k]))}"
                   for k in ("num_ways", "source_id") if k in episode)
  return (f"episode {index} seed {seed} padded (support, query) = "
          f"({rows('support_mask')}, {rows('query_mask')}) {extra}").strip()


def check_agreement(iterator, name: str, seed, start: int = 0,
                    every: int = AGREE_EVERY):
  """Yields `iterator`'s episodes, checking every `every` that all
  processes agree (see above); a disagreement raises ValueError naming both
  sides. A pass-through in single-process runs."""
  import jax  # pylint: disable=g-import-not-at-top
  client = _client()
  if client is None:
    yield from iterator
    return
  me, count = jax.process_index(), jax.process_count()
  # Every process makes the same calls in the same order: the n-th stream
  # of a name (validation repeats) gets its own keys in all of them.
  _STREAMS[name] = _STREAMS.get(name, 0) + 1
  name = f"{name}#{_STREAMS[name]}"
  check = 0
  previous = None
  for i, episode in enumerate(iterator, start):
    if (i - start) % every == 0:
      mine = episode_summary(i, seed, episode, count)
      key = f"{_AGREE_DIR}{name}/{check}/"
      client.key_value_set(f"{key}{me}", mine, allow_overwrite=True)
      for other in range(count):
        if other == me:
          continue
        try:
          theirs = client.blocking_key_value_get(f"{key}{other}",
                                                 AGREE_TIMEOUT_MS)
        except Exception as e:  # pylint: disable=broad-except
          raise ValueError(
              f"process {other} did not report episode {i} ({name}) within "
              f"{AGREE_TIMEOUT_MS // 1000} s: {' '.join(str(e).split())[:200]}"
              ) from None
        if theirs != mine:
          raise ValueError(
              f"processes disagree before building the global episode "
              f"({name}): process {me} has {mine}, process {other} has "
              f"{theirs}")
      if previous is not None:  # Keep the store small.
        try:
          client.key_value_delete(f"{previous}{me}")
        except Exception:  # pylint: disable=broad-except
          pass
      previous = key
      check += 1
    yield episode


# ---------------------------------------------------------------------------
# One compilation cache for all hosts (issue 22). JAX 0.10.2 writes
# persistent-cache entries from process 0 only (`jax/_src/compiler.py`,
# `_cache_write`), so with a per-host folder (the single-process default,
# ~/.cache/ctx_jax/jax_cache) hosts 1..n find nothing after a restart and
# compile everything again. A multi-process run therefore defaults to a
# folder in its work dir, which every host must already read and write (a
# bucket, gs://, through etils' epath as JAX supports; or a shared file
# system): process 0 writes, every process reads, and a restarted run
# compiles nothing. The cache key does not depend on the process (checked by
# tests/pod_test.py). Not chosen: `jax_share_binary_between_hosts`, which
# sends process 0's fresh compile to the others through the coordination
# service: a process that misses the cache then waits (20 min by default)
# for process 0 to publish a binary, which never comes when process 0 hit
# the cache, e.g. with per-host folders or an entry another host cannot
# see yet; with a shared folder it saves nothing after a restart.

CACHE_SUBDIR = "compilation_cache"


def compilation_cache_dir(configured: str | None, shared_root) -> str:
  """The persistent cache folder of a run.

  Args:
    configured: `config.compilation_cache_dir` ("" default, a folder, or
      "none"); anything but "" wins.
    shared_root: a folder every process of the run reaches (the work dir),
      or None.

  Returns:
    `configured` if set; in a multi-process run `<shared_root>/
    compilation_cache`; else "" (`xla_config.default_cache_dir()`).
  """
  if configured or shared_root is None:
    return configured or ""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() < 2:
    return ""
  return f"{str(shared_root).rstrip('/')}/{CACHE_SUBDIR}"


def count_cache_events() -> dict[str, int]:
  """Counts this process's persistent-cache hits and misses from now on.

  A miss is a compile (with the cache on); the dict is updated in place.
  """
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  counts = {"hits": 0, "misses": 0}

  def listener(name, **kwargs):
    del kwargs
    if name == "/jax/compilation_cache/cache_hits":
      counts["hits"] += 1
    elif name == "/jax/compilation_cache/cache_misses":
      counts["misses"] += 1
  monitoring.register_event_listener(listener)
  return counts
