"""Writes a plan's class files: in parallel, resumably, with progress.

Resume rule: a class file under its final name is complete (each is written
under a temporary name and renamed when done), so a rerun keeps it and
counts its records; temporary files left by a killed run are deleted and
their classes redone. `dataset_spec.json` is written last, so a folder
holding it was converted to the end.

Every class file gets its sidecar record index (`<class_id>.tfrecords.index`,
`record_files.load_record_offsets`), written right after the file from the
offsets known while writing; a kept file without a valid one gets it from
its headers.
"""

import concurrent.futures
import multiprocessing
import os
import sys
import time
from typing import Callable, Mapping, TextIO

from meta_dataset_pipeline import record_files
from meta_dataset_pipeline import records_writer
from meta_dataset_pipeline.conversion import common

# Workers add to this shared counter (set by `_init_worker`).
_COUNTER = None
_REPORT_EVERY_S = 0.2


class Progress:
  """A one-line progress report: classes, images, images/s and ETA.

  On a terminal the line is redrawn in place; otherwise (logs, pipes) a
  line is printed at most every `log_every_s` seconds, and at the end.
  """

  def __init__(self, name: str, num_classes: int, num_images: int,
               num_skipped: int, stream: TextIO | None,
               log_every_s: float = 10.0):
    self.name = name
    self.num_classes = num_classes
    self.num_images = num_images
    self.num_skipped = num_skipped
    self.stream = stream
    self.interactive = bool(stream) and stream.isatty()
    self.log_every_s = 0.2 if self.interactive else log_every_s
    self.start = time.monotonic()
    self.last_print = -float("inf")
    self.classes_done = 0
    self.images_done = 0

  def line(self) -> str:
    elapsed = time.monotonic() - self.start
    rate = self.images_done / elapsed if elapsed > 0 else 0.0
    left = max(self.num_images - self.images_done, 0)
    eta = "?" if rate <= 0 else _hms(left / rate)
    skipped = (f" ({self.num_skipped} already done)" if self.num_skipped
               else "")
    return (f"md-convert {self.name}: {self.classes_done}/{self.num_classes}"
            f" classes{skipped}, {self.images_done}/{self.num_images} images,"
            f" {rate:.0f} images/s, ETA {eta}")

  def update(self, images_done: int, classes_done: int, final=False):
    self.images_done = images_done
    self.classes_done = classes_done
    if self.stream is None:
      return
    now = time.monotonic()
    if final or now - self.last_print >= self.log_every_s:
      self.last_print = now
      if self.interactive:
        self.stream.write("\r" + self.line() + ("\n" if final else ""))
      else:
        self.stream.write(self.line() + "\n")
      self.stream.flush()


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _counted(images, add: Callable[[int], None]):
  """Passes `images` through, reporting their number every so often."""
  pending, last = 0, time.monotonic()
  for image in images:
    yield image
    pending += 1
    if time.monotonic() - last >= _REPORT_EVERY_S:
      add(pending)
      pending, last = 0, time.monotonic()
  add(pending)


def _write_class(records_dir: str, job: common.ClassJob,
                 add: Callable[[int], None]) -> int:
  return records_writer.write_class_records(
      records_dir, job.class_id, _counted(job.images_fn(*job.args), add),
      write_index=True)


def _kept_class_count(path: str) -> int:
  """Records of a complete class file a former run wrote; indexes it.

  Raises:
    record_files.RecordError: the file is truncated (not one of ours).
  """
  offsets = record_files.valid_record_index(path)
  if offsets is not None:
    return len(offsets) - 1
  offsets = record_files.index_records(path)
  record_files.write_record_index(path, offsets)
  return len(offsets)


def _init_worker(counter):
  global _COUNTER
  _COUNTER = counter


def _add_to_counter(n: int):
  with _COUNTER.get_lock():
    _COUNTER.value += n


def _worker_job(records_dir: str, job: common.ClassJob) -> tuple[int, int]:
  return job.class_id, _write_class(records_dir, job, _add_to_counter)


def remove_temporary_files(records_dir: str) -> list[str]:
  """Deletes files a killed run left under temporary names."""
  removed = []
  for name in os.listdir(records_dir):
    if name.startswith(records_writer.TMP_PREFIX):
      os.remove(os.path.join(records_dir, name))
      removed.append(name)
  return removed


def convert(plan: common.Plan, records_dir: str, workers: int = 1,
            stream: TextIO | None = sys.stderr) -> Mapping[int, int]:
  """Writes the class files of `plan` and its `dataset_spec.json`.

  Args:
    plan: from a source's `plan` function.
    records_dir: the output folder (created if needed); stored as given in
      the spec's `path`, as the official converter does.
    workers: number of processes writing class files (1: this process).
    stream: where progress goes; None for silence.

  Returns:
    Number of records of every class id.
  """
  os.makedirs(records_dir, exist_ok=True)
  remove_temporary_files(records_dir)
  if plan.prepare_fn is not None:
    plan.prepare_fn(records_dir)
  counts, pending = {}, []
  for job in plan.jobs:
    path = records_writer.class_records_path(records_dir, job.class_id)
    if os.path.isfile(path):
      try:
        counts[job.class_id] = _kept_class_count(path)
        continue
      except record_files.RecordError:
        os.remove(path)  # Not written by us (ours are complete); redo it.
    pending.append(job)
  progress = Progress(plan.name, len(pending),
                      sum(j.expected or 0 for j in pending),
                      len(plan.jobs) - len(pending), stream)
  progress.update(0, 0)
  if workers <= 1 or len(pending) <= 1:
    images_done, classes_done = [0], [0]

    def add(n):
      images_done[0] += n
      progress.update(images_done[0], classes_done[0])

    for job in pending:
      counts[job.class_id] = _write_class(records_dir, job, add)
      classes_done[0] += 1
      progress.update(images_done[0], classes_done[0])
  else:
    _convert_in_workers(pending, records_dir, workers, counts, progress)
  progress.update(progress.images_done, len(pending), final=True)
  spec = plan.spec_fn(counts, records_dir)
  records_writer.write_dataset_spec(records_dir, spec)
  return counts


def _convert_in_workers(jobs, records_dir, workers, counts, progress):
  """Runs `jobs` on a process pool, biggest first, updating `counts`."""
  # Spawned, not forked: the caller may hold threads (tests import JAX).
  context = multiprocessing.get_context("spawn")
  counter = context.Value("q", 0)
  # Biggest classes first, so that one long class does not finish last.
  order = sorted(jobs, key=lambda j: -(j.expected or 0))
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=min(workers, len(jobs)), mp_context=context,
      initializer=_init_worker, initargs=(counter,)) as pool:
    futures = [pool.submit(_worker_job, records_dir, j) for j in order]
    finished = 0
    try:
      not_done = set(futures)
      while not_done:
        done, not_done = concurrent.futures.wait(
            not_done, timeout=_REPORT_EVERY_S,
            return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          class_id, count = future.result()  # Re-raises a worker's error.
          counts[class_id] = count
          finished += 1
        progress.update(counter.value, finished)
    except BaseException:
      for future in futures:
        future.cancel()
      raise
