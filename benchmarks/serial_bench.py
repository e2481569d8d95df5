"""Ceiling of the episode pipeline's serial part, and decode cost per image.

    python benchmarks/serial_bench.py --replicas DIR[,DIR] [--seconds 10]
        [--sizes 84,224] [--read_threads 1,8] [--rounds 2] [--cold]
        [--output out.json]

The episode pipeline plans episodes and reads their records in one Python
generator thread (`pipeline._episode_generator`: sample a description,
take record indices from the class streams, read each record by offset,
verify its CRC, parse and check it, pack the episode); only decoding,
resizing and padding run in parallel `tf.data` map calls. This measures:

- `serial`: the generator alone (exactly the function `tf.data` calls; no
  decoding), episodes/s and images/s, in this one thread: the pipeline's
  ceiling whatever the number of cores;
- `decode_us_per_image`: the CPU time of the parallel part per image, from
  the pipeline's own episode map over pre-generated episodes run with one
  map call and TF's thread pools limited to one thread;

and projects the pipeline's rate on C cores as
min(serial, (C - 1) / decode cost) images/s (one core runs the generator),
with the best serial rate measured. `--read_threads 1,8` compares serial
reads with 8 reading threads (one task per class; the default for URL file
systems).
Run it on a replica of real-size JPEGs (`replica_data.py --natural
500x375x16`) and of tiny ones. Training episodes of the official config
(variable ways and shots, ILSVRC's DAG when the source has one).
"""

import argparse
import itertools
import json
import os
import platform
import sys
import time

# This checkout's packages, not an installed copy's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _generator(spec, seed=0):
  """The pipeline's generator over TRAIN episodes, and its sources."""
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import padding  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import reader  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  seed = [seed, 0]
  sources = pipeline._make_sources([spec], mdp.Split.TRAIN,
                                   mdp.EpisodeDescriptionConfig(), seed,
                                   None, None)
  buckets = padding.buckets_for_samplers([s.sampler for s in sources])
  return pipeline._episode_generator(
      sources, seed, buckets, reader.DEFAULT_SHUFFLE_BUFFER_SIZE)(), sources


def _evict(root):
  """Drops the replica's files from the page cache (cold reads)."""
  for entry in os.scandir(root):
    fd = os.open(entry.path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _serial(spec, seconds, read_threads=None, cold=False, seed=0):
  """Generator-only rate: (episodes/s, images/s, images per episode)."""
  from meta_dataset_pipeline import reader  # pylint: disable=g-import-not-at-top
  if read_threads is not None:
    # The generator builds its reader with the defaults (for local files, 1
    # thread); this benchmark alone overrides them.
    reader.EpisodeReader.__init__.__defaults__ = (
        reader.DEFAULT_SHUFFLE_BUFFER_SIZE, read_threads)
  if cold:
    _evict(spec.path)
  gen, _ = _generator(spec, seed)
  for _ in range(20):  # Warm-up: first reads index the classes.
    next(gen)
  start, episodes, images = time.perf_counter(), 0, 0
  while time.perf_counter() - start < seconds:
    images += len(next(gen)["lengths"])
    episodes += 1
  elapsed = time.perf_counter() - start
  return episodes / elapsed, images / elapsed, images / episodes


def _decode_cost(spec, size, seconds):
  """CPU us per image of the pipeline's episode map, on one thread."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import episode_map  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  gen, _ = _generator(spec)
  episodes = list(itertools.islice(gen, 20))
  source = tf.data.Dataset.from_generator(
      lambda: itertools.cycle(episodes),
      output_signature=episode_map.EPISODE_SIGNATURE)
  mapped = source.map(episode_map.episode_fn(size, None, None),
                      num_parallel_calls=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  it = mapped.with_options(options).as_numpy_iterator()
  next(it)
  cpu, wall, images, count = time.process_time(), time.perf_counter(), 0, 0
  while time.perf_counter() - wall < seconds or count < 5:
    ep = next(it)
    images += int(ep["support_mask"].sum() + ep["query_mask"].sum())
    count += 1
  return (time.process_time() - cpu) / images * 1e6


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--replicas", required=True)
  p.add_argument("--seconds", type=float, default=10)
  p.add_argument("--sizes", default="84,224")
  p.add_argument("--cores", default="1,2,4,8,16,32,48,96")
  p.add_argument("--read_threads", default="1,8",
                 help="record-reading threads to compare")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--cold", action="store_true",
                 help="evict the replica from the page cache before each "
                 "serial run (posix_fadvise DONTNEED on its files only)")
  p.add_argument("--output")
  args = p.parse_args(argv)
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  results = []
  for root in args.replicas.split(","):
    spec = mdp.load_dataset_spec(root)
    row = {"replica": root, "load_before": os.getloadavg(), "serial": []}
    # Rounds alternate the thread counts; each round a new seed (other
    # records), `--cold` evicting the replica from the page cache first.
    for r in range(args.rounds):
      for threads in (int(t) for t in args.read_threads.split(",")):
        eps, ips, per_episode = _serial(spec, args.seconds, threads,
                                        args.cold, seed=r)
        row["serial"].append({
            "read_threads": threads, "round": r, "cold": args.cold,
            "episodes_per_s": eps, "images_per_s": ips,
            "images_per_episode": per_episode, "load": os.getloadavg()})
        print(json.dumps(row["serial"][-1]), flush=True)
    ips = max(x["images_per_s"] for x in row["serial"])
    for size in (int(s) for s in args.sizes.split(",")):
      us = _decode_cost(spec, size, args.seconds)
      row[f"decode_us_per_image_{size}"] = us
      row[f"projected_images_per_s_{size}"] = {
          c: min(ips, max(c - 1, 1) * 1e6 / us)
          for c in (int(x) for x in args.cores.split(","))}
    row["load_after"] = os.getloadavg()
    results.append(row)
    print(json.dumps(row), flush=True)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"machine": platform.platform(), "cpus": os.cpu_count(),
                 "runs": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
