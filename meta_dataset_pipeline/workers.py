"""Episodes read, decoded and padded by worker processes.

One `pipeline.EpisodePlanner` per process plans every episode in order (the
sequential, random part: description, records, buckets, SimCLR flag,
augmentation seeds, row block; about 1 ms per ILSVRC episode). K worker
processes do the rest of episode i, the part that costs CPU: they read its
records (CRCs verified, records parsed and checked), decode, resize,
augment and pad them with the very episode map of the in-process pipeline
(`episode_map.episode_fn`), and write the padded arrays into a shared-memory
segment that this process lent them. The consumer hands the episodes out in
order i, as numpy arrays that *are* views of that memory: nothing is copied
on the serial side, and the segment goes back to the pool when the last view
of the episode is gone (so a step that still holds an episode, or a device
transfer still reading it, keeps it alive).

Why this design, and not a library's:
- Grain (`grain.python`) loads records by index in worker processes, with
  per-record transformations; our episode i is the product of a sequential
  planner (per-class shuffled streams with flushes, the official RandomState
  draws of `rng="official"`), which a random-access index -> record source
  cannot express without replanning every episode in every worker.
- tf.data service needs a dispatcher and worker servers and sends every
  element over gRPC: a 224 px ILSVRC episode is up to 600 MB of float32, so
  the serial consumer would copy and deserialize what it should only hand
  over.
- `multiprocessing.shared_memory` (standard library) gives exactly the
  zero-copy hand-over, with `spawn`ed workers: forking a process that runs
  TensorFlow or JAX threads is unsafe.

Episode i is the same for every number of workers (the plan is made here,
the map is the same function, every random op takes its seed from the plan).
Errors keep their meaning: a bad record or image met by a worker ends the
stream with the same one-line message as in-process reading (file, record,
byte or class), raised when the consumer reaches that episode; a worker that
dies ends it with `WorkerError`, naming the worker and the episode. In both
cases every worker is stopped, so nothing hangs.
"""

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import pickle
import queue
import sys
import threading
import time
import weakref
from multiprocessing import shared_memory

import numpy as np

from meta_dataset_pipeline import files
from meta_dataset_pipeline import record_files

# Fields of the hand-over start at multiples of this (cache lines, and SIMD
# alignment for the device copy).
_ALIGN = 64
# Per-row bytes of everything but the image in the episode dict (labels,
# mask, class ids, on-device augmentation seeds and mode: 21 bytes), rounded
# up; `_slot_bytes` is an upper bound of an episode's size.
_ROW_EXTRA_BYTES = 64
_MAX_FIELDS = 32
# How often the consumer looks at its workers while it waits.
_POLL_SECONDS = 0.2
# A worker whose parent is gone exits after at most this long.
_ORPHAN_POLL_SECONDS = 1.0


class WorkerError(ChildProcessError):
  """An episode worker process died or could not start."""


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
  """What a worker needs to build the episode map (`episode_map.episode_fn`).

  Picklable: it is sent to each spawned worker.
  """
  image_size: int
  support_augmentation: object
  query_augmentation: object
  augmenter: object
  tf_threads: int = 1


def default_num_workers(cpus: int | None = None,
                        processes_per_host: int | None = None) -> int:
  """Workers per pipeline: the CPUs this process may use, less one.

  One CPU stays with the consumer (planning, the training loop). Below 4
  CPUs the in-process pipeline (0) is as fast and starts at once.

  Args:
    cpus: CPUs available (None: this process's CPU affinity).
    processes_per_host: processes sharing those CPUs, e.g. one per GPU
      (None: `CTX_JAX_PROCESSES_PER_HOST`, set by the project's launchers,
      else 1). Not applied when the affinity already is a subset of the
      host's CPUs (SLURM's or taskset's binding did the split).
  """
  if processes_per_host is None:
    processes_per_host = int(os.environ.get("CTX_JAX_PROCESSES_PER_HOST",
                                            "1") or 1)
  if cpus is None:
    try:
      cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
      cpus = os.cpu_count() or 1
    if cpus < (os.cpu_count() or cpus):
      processes_per_host = 1
  cpus //= max(1, processes_per_host)
  return 0 if cpus < 4 else cpus - 1


def _slot_bytes(rows: int, image_size: int) -> int:
  """Upper bound of the bytes of an episode of `rows` padded rows."""
  return (rows * (image_size * image_size * 3 * 4 + _ROW_EXTRA_BYTES)
          + _ALIGN * _MAX_FIELDS)


class _Segment(shared_memory.SharedMemory):
  """A segment whose garbage collection never fails: its last episode's
  arrays may be freed in the same moment, with their buffer still
  exported (the mapping then goes with them)."""

  def __del__(self):
    try:
      super().__del__()
    except BufferError:
      pass


class _Segments:
  """The consumer's pool of shared-memory segments, lent one per episode.

  A segment comes back (`give_back`, from the episode's finalizer, in any
  thread) when no view of its episode is left; `take` reuses the smallest
  free segment that is large enough, else creates one. Only the consumer
  creates and unlinks segments; workers attach by name.
  """

  def __init__(self, size: int = 0):
    # Every segment gets at least `size` bytes (the largest episode): a
    # segment is then never too small, so none is dropped and re-created,
    # and each page is faulted in at most once. A first write to a shared
    # page costs a fault (here 450 us per 600 KB image, against 50 us for
    # the copy into a page already in place). Only written pages take
    # memory: an episode held by the user costs its own size.
    self._size = size
    self._free = []
    self._returned = collections.deque()  # Appends are atomic: no lock.
    self._all = {}
    self.dropped = []  # Names unlinked since the workers last heard.

  def take(self, nbytes: int) -> shared_memory.SharedMemory:
    while self._returned:
      self._free.append(self._returned.popleft())
    fits = [s for s in self._free if s.size >= nbytes]
    if fits:
      best = min(fits, key=lambda s: s.size)
      self._free.remove(best)
      return best
    if len(self._free) > 2:  # Too small for the episodes seen now: drop.
      self._drop(min(self._free, key=lambda s: s.size))
    # Room to grow: the next larger bucket reuses this segment.
    size = -(-max(int(nbytes * 1.25), self._size) // (1 << 20)) << 20
    segment = _Segment(create=True, size=size)
    self._all[segment.name] = segment
    return segment

  def give_back(self, segment):
    self._returned.append(segment)

  def _drop(self, segment):
    self._free.remove(segment)
    del self._all[segment.name]
    self.dropped.append(segment.name)
    _close(segment)
    segment.unlink()

  def close(self):
    for segment in self._all.values():
      _close(segment)
      try:
        segment.unlink()
      except FileNotFoundError:
        pass
    self._all.clear()
    self._free.clear()


def _close(segment):
  try:
    segment.close()
  except BufferError:  # Views still held by the user: the mapping stays.
    pass


def _attach(name: str) -> shared_memory.SharedMemory:
  """Attaches a consumer's segment.

  Spawned workers share the consumer's resource tracker, which holds each
  name once: the attach registers nothing new, and the consumer's unlink
  unregisters it (so a crashed consumer's segments are still unlinked).
  """
  return _Segment(name=name)


class RowReader:
  """Reads the encoded images of an episode's rows from class files.

  What `reader.ClassStream.read_image` does for one record, for the rows of
  a plan (`row_files`, `record_index`, `class_ids`): record offsets from the
  class file's index (`record_files.load_record_offsets`: its sidecar when
  there is one; checked against the spec's count on first use), each
  class's records read together (`record_files.read_records`: few ranged
  reads, CRCs verified), then parsed and checked. On URL file systems
  (buckets), where each read waits on a request, the classes of an episode
  are read by `url_threads` threads.
  """

  def __init__(self, url_threads: int = 32):
    self._offsets = {}
    self._url_threads = url_threads
    self._pool = None

  def offsets(self, path: str, num_records: int, class_id: int):
    offsets = self._offsets.get(path)
    if offsets is None:
      offsets = record_files.load_record_offsets(path, num_records,
                                                 class_id)
      self._offsets[path] = offsets
    return offsets

  def _read_class(self, path, indices, class_id, count):
    offsets = self.offsets(path, count, class_id)
    return record_files.read_records(path, indices, offsets, class_id)

  def read(self, row_files, record_index, class_ids, counts) -> list[bytes]:
    """The checked image bytes of each row.

    Args:
      row_files: [N] class file of each row.
      record_index: [N] record number of each row in its file.
      class_ids: [N] class id of each row.
      counts: class id -> the spec's number of records of the class.
    """
    # Here, not at the top: a spawned worker imports this module before it
    # can set TensorFlow's logging, and `reader` imports TensorFlow.
    from meta_dataset_pipeline import reader  # pylint: disable=g-import-not-at-top
    by_file = {}  # path -> (class id, [row], [record index])
    for row, (path, index, class_id) in enumerate(zip(
        row_files, record_index.tolist(), class_ids.tolist())):
      path = path.decode() if isinstance(path, bytes) else str(path)
      rows, indices = by_file.setdefault(path, (class_id, [], []))[1:]
      rows.append(row)
      indices.append(index)
    jobs = [(path, indices, class_id, counts[class_id])
            for path, (class_id, _, indices) in by_file.items()]
    remote = any(files.is_url(path) for path in by_file)
    if remote and len(jobs) > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._url_threads, thread_name_prefix="md-worker-read")
      done = list(self._pool.map(lambda job: self._read_class(*job), jobs))
    else:
      done = [self._read_class(*job) for job in jobs]
    images = [b""] * len(record_index)
    for (path, (class_id, rows, indices)), records in zip(by_file.items(),
                                                          done):
      for row, index, record in zip(rows, indices, records):
        images[row] = reader.checked_image(record, path, index, class_id)
    return images

  def close(self):
    if self._pool is not None:
      self._pool.shutdown()


def _worker_main(worker_id, setup, tasks, results, parent_pid):
  """A worker process: episodes from `tasks` -> shared memory -> `results`.

  `setup` is a pickled `WorkerSetup`, unpickled only here: it refers to
  TensorFlow-importing modules, and TensorFlow must not load before the
  logging setting below.
  """
  # Quiet TensorFlow's C++ start-up lines: K workers would print them K
  # times (the user's own setting wins). TF 2.21 prints some of them
  # whatever TF_CPP_MIN_LOG_LEVEL says, so its import also runs with
  # stderr muted (an import error still reaches the consumer, below).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    with _stderr_muted():
      setup = pickle.loads(setup)
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from meta_dataset_pipeline import episode_map  # pylint: disable=g-import-not-at-top
    # Parallelism comes from the workers: one thread each keeps K workers
    # on K CPUs instead of K thread pools fighting over them.
    tf.config.threading.set_intra_op_parallelism_threads(setup.tf_threads)
    tf.config.threading.set_inter_op_parallelism_threads(setup.tf_threads)
    process = tf.function(
        episode_map.episode_fn(setup.image_size, setup.support_augmentation,
                               setup.query_augmentation, setup.augmenter),
        input_signature=[episode_map.EPISODE_SIGNATURE])
  except Exception as e:  # pylint: disable=broad-except
    results.put(("failed", worker_id, -1, f"{type(e).__name__}: {e}", 0, 0))
    return
  rows = RowReader()
  segments = {}
  images_done = 0
  # A reading thread fetches the records of the worker's next episode
  # while this thread decodes the current one: file and bucket reads (and
  # the CRC) release the GIL, so a bucket's latency hides behind decoding.
  ready = queue.Queue(maxsize=1)
  threading.Thread(target=_read_ahead, daemon=True, name="md-read-ahead",
                   args=(tasks, ready, rows, parent_pid)).start()
  while True:
    item = ready.get()
    if item is None:
      break
    (index, plan, _, name, size, dropped), images, error = item
    for gone in dropped:
      segment = segments.pop(gone, None)
      if segment is not None:
        _close(segment)
    if index is None:  # Only news of dropped segments.
      continue
    try:
      if error is not None:
        raise error
      blob, lengths = episode_map.pack(images)
      out = process({"blob": blob, "lengths": lengths, **plan})
      # Images through DLPack: a view of TF's buffer (`.numpy()` would copy
      # each 600 KB image once more before `_write` copies it).
      out = {k: np.from_dlpack(v) if v.dtype == tf.float32 else v.numpy()
             for k, v in out.items()}
      if name not in segments:
        segments[name] = _attach(name)
      layout = _write(segments[name], size, out)
    except record_files.RecordError as e:
      results.put(("record", worker_id, index, str(e), 0, 0))
      continue
    except tf.errors.OpError as e:
      results.put(("decode", worker_id, index, e.message, 0, 0))
      continue
    except Exception as e:  # pylint: disable=broad-except
      results.put(("failed", worker_id, index, f"{type(e).__name__}: {e}",
                   0, 0))
      continue
    # The worker's whole CPU time so far (both threads), and its images.
    images_done += len(images)
    results.put(("done", worker_id, index, layout, time.process_time(),
                 images_done))
  rows.close()
  for segment in segments.values():
    _close(segment)


@contextlib.contextmanager
def _stderr_muted():
  """File descriptor 2 points at /dev/null meanwhile (C++ writes too)."""
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _read_ahead(tasks, ready, rows, parent_pid):
  """Worker thread: task -> (task, images or None, error or None)."""
  while True:
    try:
      task = tasks.get(timeout=_ORPHAN_POLL_SECONDS)
    except queue.Empty:
      if os.getppid() != parent_pid:  # The consumer is gone.
        ready.put(None)
        return
      continue
    if task is None:
      ready.put(None)
      return
    index, plan, counts = task[:3]
    images = error = None
    if index is not None:
      try:
        images = rows.read(plan["row_files"], plan["record_index"],
                           plan["class_ids"], counts)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    ready.put((task, images, error))


def _write(segment, size, arrays) -> list:
  """Copies `arrays` into `segment`; returns their (key, dtype, shape,
  offset) layout."""
  layout, offset = [], 0
  for key, value in arrays.items():
    value = np.asarray(value)
    if offset + value.nbytes > size:
      raise ValueError(f"episode does not fit its segment ({size} bytes)")
    view = np.ndarray(value.shape, value.dtype, buffer=segment.buf,
                      offset=offset)
    view[...] = value
    layout.append((key, value.dtype.str, value.shape, offset))
    offset += -(-value.nbytes // _ALIGN) * _ALIGN
    del view
  return layout


class EpisodeWorkers:
  """Iterator of a planner's episodes, prepared by `num_workers` processes.

  Episode i is sent to worker i mod K; at most `window` episodes are in
  flight. `max_rows` (the largest padded support + query size) sizes the
  shared-memory segments. Yields episode dicts whose arrays are views of shared memory (see
  the module docstring); `close()` (also at exit and when the iterator is
  garbage collected) stops the workers and frees the memory.
  """

  def __init__(self, planner, setup: WorkerSetup, num_workers: int,
               window: int | None = None, max_rows: int = 0):
    if num_workers < 1:
      raise ValueError(f"num_workers={num_workers}: needs at least 1")
    self._planner = planner
    self._setup = setup
    self._window = max(window or 0, num_workers + 1)
    # Pages are only backed when written: sizing every segment for the
    # largest episode (`max_rows` padded rows) costs memory only for what
    # the episodes actually use.
    self._segments = _Segments(_slot_bytes(max_rows, setup.image_size)
                               if max_rows else 0)
    self._pending = {}  # index -> (segment, message)
    self._lent = {}     # index -> segment, while a worker prepares it
    self._counts = [{c: s.spec.get_total_images_per_class(c)
                     for c in s.class_set} for s in planner.sources]
    self._next_plan = planner.index
    self._next_out = planner.index
    # worker -> (its CPU seconds, images done), as last reported.
    self._worker_clock = {}
    self._closed = False
    ctx = multiprocessing.get_context("spawn")
    self._results = ctx.Queue()
    self._tasks = [ctx.Queue() for _ in range(num_workers)]
    self._procs = [
        ctx.Process(target=_worker_main, name=f"md-episode-worker-{k}",
                    args=(k, pickle.dumps(setup), self._tasks[k],
                          self._results,
                          os.getpid()), daemon=True)
        for k in range(num_workers)]
    with _main_module_hidden():
      for p in self._procs:
        p.start()
    # Stop the workers even if the iterator is never closed.
    self._finalizer = weakref.finalize(
        self, _shutdown, self._procs, self._tasks, self._segments)

  def __iter__(self):
    return self

  @property
  def worker_cpu_seconds(self) -> float:
    """CPU time the workers have used so far (all their threads)."""
    return sum(cpu for cpu, _ in self._worker_clock.values())

  @property
  def worker_images(self) -> int:
    """Images the workers have prepared so far."""
    return sum(n for _, n in self._worker_clock.values())

  def _dispatch(self):
    while self._next_plan < self._next_out + self._window:
      plan, _, _ = self._planner.next()
      index = self._next_plan
      self._next_plan += 1
      rows = int(plan["info"][1]) + int(plan["info"][2])
      size = _slot_bytes(rows, self._setup.image_size)
      segment = self._segments.take(size)
      self._lent[index] = segment
      counts = self._counts[int(plan["info"][4])]
      dropped, self._segments.dropped = self._segments.dropped, []
      worker = index % len(self._procs)
      # Every worker must hear of dropped segments; only this one gets the
      # episode.
      for k, q in enumerate(self._tasks):
        if k != worker and dropped:
          q.put((None, None, None, None, None, dropped))
      self._tasks[worker].put(
          (index, plan, {c: counts[c] for c in set(
              plan["class_ids"].tolist())}, segment.name, size, dropped))

  def _wait(self, index):
    """The message of episode `index`, watching the workers meanwhile."""
    while index not in self._pending:
      try:
        msg = self._results.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        for k, p in enumerate(self._procs):
          if p.exitcode is not None:
            code = p.exitcode
            how = (f"was killed by signal {-code}" if code < 0
                   else f"exited with status {code}")
            self.close()
            raise WorkerError(
                f"episode worker {k} (pid {p.pid}) {how} while episode "
                f"{index} was being prepared") from None
        continue
      kind, worker, i, payload = msg[:4]
      if kind == "failed" and i < 0:
        self.close()
        raise WorkerError(f"episode worker {worker} could not start: "
                          f"{payload}")
      self._pending[i] = msg
    return self._pending.pop(index)

  def __next__(self):
    if self._closed:
      raise StopIteration
    self._dispatch()
    index = self._next_out
    kind, worker, _, payload, cpu, images = self._wait(index)
    self._next_out += 1
    segment = self._lent.pop(index)
    if kind != "done":
      self._segments.give_back(segment)
      self.close()
      if kind == "record":
        raise record_files.RecordError(payload)
      if kind == "decode":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        raise tf.errors.InvalidArgumentError(None, None, payload)
      raise WorkerError(f"episode {index}: {payload}")
    self._worker_clock[worker] = (cpu, images)
    return _views(segment, payload, self._segments.give_back)

  def close(self):
    """Stops the workers and frees the shared memory (idempotent)."""
    self._closed = True
    self._finalizer()

  def __del__(self):
    self.close()


@contextlib.contextmanager
def _main_module_hidden():
  """Keeps `spawn` from running the user's main script in each worker.

  `spawn` re-imports `__main__` in the child (by path or module name) so
  that targets defined there resolve; ours live in this module, and a
  script or notebook without an `if __name__ == "__main__"` guard would
  otherwise start the pipeline again in every worker.
  """
  main = sys.modules.get("__main__")
  saved = {k: getattr(main, k) for k in ("__spec__", "__file__")
           if hasattr(main, k)}
  try:
    if main is not None:
      main.__spec__ = None
      if hasattr(main, "__file__"):
        del main.__file__
    yield
  finally:
    for k, v in saved.items():
      setattr(main, k, v)


def _views(segment, layout, give_back) -> dict:
  """The episode dict over `segment`; the segment is given back when the
  last of its arrays is garbage."""
  end = max(offset + int(np.prod(shape, dtype=np.int64)) *
            np.dtype(dtype).itemsize for _, dtype, shape, offset in layout)
  owner = (ctypes.c_uint8 * end).from_buffer(segment.buf)
  weakref.finalize(owner, give_back, segment)
  out = {}
  for key, dtype, shape, offset in layout:
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(owner, dtype, count, offset).reshape(shape)
    # Scalars as numpy scalars (copies), as `as_numpy_iterator` gives them.
    out[key] = array[()] if not shape else array
  return out


def _shutdown(procs, tasks, segments):
  for q in tasks:
    try:
      q.put(None)
    except (ValueError, OSError):
      pass
  deadline = time.monotonic() + 5
  for p in procs:
    p.join(max(0.0, deadline - time.monotonic()))
    if p.exitcode is None:
      p.terminate()
      p.join(1)
    if p.exitcode is None:
      p.kill()
      p.join(1)
  for q in tasks:
    q.cancel_join_thread()
    q.close()
  segments.close()
