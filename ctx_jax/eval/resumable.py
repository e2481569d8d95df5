"""Resumable per-domain evaluation: what identifies the work, and its cache.

A domain's per-episode accuracies are saved every chunk under a key made of
the model (its export's config and a fingerprint of its state) and of what
determines the episodes (split, source, dataset spec, episode description,
image size, seed, count). A rerun with the same key resumes; a changed key
starts that domain afresh.
"""

import hashlib
import json
import os
from typing import Any

from absl import logging
from etils import epath

from ctx_jax import paths


def _fingerprint_dir(path: epath.Path) -> str:
  """Hash of the names, sizes and modification times of files under `path`."""
  digest = hashlib.sha256()
  # `walk`, not `rglob`: epath refuses recursive globs (one request per
  # folder level on an object store).
  files = sorted(root / name for root, _, names in path.walk()
                 for name in names)
  for f in files:
    if paths.is_local(f):  # Nanosecond times; epath's stat has seconds.
      stat = os.stat(f)
      size, mtime = stat.st_size, stat.st_mtime_ns
    else:
      stat = f.stat()
      size, mtime = stat.length, stat.mtime
    digest.update(f"{f.relative_to(path)}\0{size}\0{mtime}\n".encode())
  return digest.hexdigest()


def model_key(model_dir: str | None) -> dict[str, Any]:
  """What identifies the evaluated model: its export's config and state."""
  if model_dir is None:
    return {"model": "pixels"}
  path = paths.resolve(model_dir)
  from ctx_jax.checkpoints import export  # pylint: disable=g-import-not-at-top
  return {"model": str(path),
          "model_config": export.load_model_config(path).to_dict(),
          "model_state": _fingerprint_dir(path / export.STATE_DIR)}


def source_key(config, split: str, source: str, num_episodes: int,
               seed: int) -> dict[str, Any]:
  """What determines one domain's episodes (beyond the model)."""
  data = config.data
  episode = data.train_episode if split == "TRAIN" else data.eval_episode
  root = paths.resolve(data.records_root or ".")
  spec = root / source / "dataset_spec.json"
  spec_hash = (hashlib.sha256(spec.read_bytes()).hexdigest()
               if spec.is_file() else None)
  key = {"split": split, "source": source, "records_root": str(root),
         "dataset_spec_sha256": spec_hash, "episode": episode.to_dict(),
         "image_size": int(data.image_size),
         "shuffle_buffer_size": int(data.shuffle_buffer_size),
         "seed": int(seed), "num_episodes": int(num_episodes)}
  if data.get("format", "records") == "tfds":
    # The spec and class slices live in the TFDS metadata; the benchmark
    # version picks the splits.
    metadata = sorted((root / "meta_dataset" / source).glob("*/metadata.json"))
    key.update(format="tfds", tfds_md_version=data.tfds_md_version,
               dataset_spec_sha256=hashlib.sha256(b"".join(
                   m.read_bytes() for m in metadata)).hexdigest())
  return key


class EpisodeCache:
  """Per-episode accuracies of finished work, saved after every chunk.

  File layout: `{"sources": {name: {"key": {...}, "accuracies": [...]}}}`.
  Only the chief process writes; every write is atomic, so an interrupted
  evaluation never loses (or corrupts) what was already saved.
  """

  def __init__(self, path: epath.Path, resume: bool, write: bool):
    self.path, self.write = path, write
    self.data = {"sources": {}}
    if resume and path.is_file():
      try:
        self.data = json.loads(path.read_text())
        self.data.setdefault("sources", {})
      except (json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path} is not a readable ctx-eval episode file "
                         f"({e}); move it away or pass --noresume") from e

  def done(self, source: str, key: dict[str, Any]) -> list[float]:
    """Saved accuracies for `source` if saved under the same `key`."""
    entry = self.data["sources"].get(source)
    if entry is None:
      return []
    if entry.get("key") != key:
      changed = sorted(k for k in set(key) | set(entry.get("key", {}))
                       if key.get(k) != entry.get("key", {}).get(k))
      logging.warning("%s: saved episodes of %s were made with different %s;"
                      " starting afresh", self.path, source, changed)
      print(f"{source}: settings changed ({', '.join(changed)}); saved "
            "episodes discarded", flush=True)
      return []
    return list(entry["accuracies"])[:key["num_episodes"]]

  def save(self, source: str, key: dict[str, Any],
           accuracies: list[float]) -> None:
    self.data["sources"][source] = {"key": key,
                                    "accuracies": list(accuracies)}
    if self.write:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      paths.write_atomic(self.path, json.dumps(self.data) + "\n")


def evaluate_sources(model, model_dir, config, mesh, split, sources,
                     num_episodes, seed, cache: EpisodeCache,
                     chunk_size: int, is_chief: bool) -> dict[str, dict]:
  """Evaluates each source (resuming from `cache`); failures become rows."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ctx_jax import config_checks  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import episodic  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  log = print if is_chief else (lambda _: None)
  base_key = model_key(model_dir)
  rows = {}
  for source in sources:
    try:
      config_checks.data_source_dir(config.data, source)
      key = dict(base_key, **source_key(config, split, source, num_episodes,
                                        seed))
      accuracies = cache.done(source, key)
      start = len(accuracies)
      if jax.process_count() > 1:
        # Every process must skip the same episodes: the chief's file rules.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
        if not is_chief:
          accuracies = [float("nan")] * start
      if start:
        log(f"{source}: resuming, {start}/{num_episodes} episodes already "
            f"done ({cache.path})")
      progress = episodic.RateLogger(source, num_episodes, start, log=log)

      def on_chunk(values, source=source, key=key, accuracies=accuracies,
                   progress=progress):
        accuracies.extend(values)
        cache.save(source, key, accuracies)
        progress(len(accuracies))

      if start < num_episodes:
        evaluate.source_accuracies(
            model, config, mesh, split, source, num_episodes, seed,
            start=start, chunk_size=chunk_size, on_chunk=on_chunk)
      rows[source] = episodic.summarize(accuracies).as_dict()
    except FileNotFoundError as e:
      rows[source] = {"error": str(e)}
    except ValueError as e:
      if jax.process_count() > 1 and _read_error(e):
        # A bad record seen by one process only: the others wait for it in
        # a collective; stop them all (distributed.fail_together).
        raise
      logging.exception("evaluation of %s failed", source)
      rows[source] = {"error": str(e)}
    if "error" in rows[source]:
      log(f"{source}: FAILED: {rows[source]['error']}")
    else:
      log(f"{source}: {100 * rows[source]['mean']:.2f} ± "
          f"{100 * rows[source]['ci95']:.2f}% over {num_episodes} episodes")
  return rows


def _read_error(e: ValueError) -> bool:
  """A record that could not be read (`RecordError`), as one process sees."""
  from meta_dataset_pipeline import record_files  # pylint: disable=g-import-not-at-top
  return isinstance(e, record_files.RecordError)
