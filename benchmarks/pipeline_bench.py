"""Episode pipeline throughput: ours, and upstream's on the same records.

    python benchmarks/pipeline_bench.py [--official_src DIR --gin_path DIR]
        [--sizes 84,126,224] [--seconds 10] [--rounds 2] [--output out.json]
        [--cache_mb 1024] [--warmup_seconds 20]
    python benchmarks/pipeline_bench.py --index_bench 1000,100,2000

Measures episodes/s and images/s (real, unpadded images) of the one-source
pipeline on the shared fixture records (`omniglot`, bi-level, 105x105 JPEGs;
`dtd`, flat, JPEGs of varied sizes) and of the multi-source pipeline over
both, with the official variable-way/shot episode config and no
augmentation, at each image size. Every measurement runs in a fresh
subprocess (so the two implementations do not share TF state), after one
warm-up episode, for at least `--seconds`; implementations alternate
round by round, and every round is kept (the table shows the best; the
JSON has all rounds, their medians and the load average around each run).

`ours` is the default (faithful, uncached) pipeline. `ours_cache` is the
same with `decoded_cache_bytes=--cache_mb` MiB, measured after
`--warmup_seconds` of warm-up, i.e. warm: it reports the share of images
served from the cache without reading their record. The cold cache run is
`ours` plus one scatter per new image.

`--index_bench FILES,RECORDS,BYTES` instead times the build-time record
count check (`reader.check_record_count`) on a synthetic split.

The official pipeline (google-research/meta-dataset) runs when
`--official_src` points at an extracted copy of that repository (e.g.
`git archive HEAD meta_dataset | tar x`) and `--gin_path` at a folder
holding the `gin-config` package (`pip install --target DIR gin-config`).
It is run unmodified with upstream's data config (shuffle buffer 1000, 1 MB
read buffers, 64 prefetched examples per class, decoders with zero-strength
augmentation); two import-time shims are needed on current TF: `gin.tf`
(which needs the removed `tf.estimator`) is aliased to `gin`, and the
SimCLR helper module, used only for SimCLR episodes, is stubbed.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORDS = REPO.parent / "shared" / "fixtures" / "md_records"


def _measure(iterator, count_images, seconds, warmup_seconds=0.0):
  # Graph building, first reads, buffer filling (and the cache, if any).
  next(iterator)
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    next(iterator)
  start, episodes, images = time.perf_counter(), 0, 0
  while time.perf_counter() - start < seconds or episodes < 5:
    images += count_images(next(iterator))
    episodes += 1
  elapsed = time.perf_counter() - start
  return {"episodes": episodes, "seconds": elapsed,
          "episodes_per_s": episodes / elapsed,
          "images_per_s": images / elapsed}


def _ours(sources, image_size, seconds, cache_mb=0, warmup_seconds=0.0,
          num_workers=0):
  """Our pipeline; with `cache_mb`, the decoded-image cache, warmed up;
  with `num_workers`, that many worker processes (`workers.py`)."""
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import reader  # pylint: disable=g-import-not-at-top
  reads = {"cached": 0, "read": 0}
  read_image = reader.ClassStream.read_image

  def counting_read_image(stream, index):
    image = read_image(stream, index)
    reads["cached" if not image else "read"] += 1
    return image

  reader.ClassStream.read_image = counting_read_image
  start = time.perf_counter()
  specs = [mdp.load_dataset_spec(RECORDS / s) for s in sources]
  cfg = mdp.EpisodeDescriptionConfig()
  options = {"decoded_cache_bytes": int(cache_mb * 2**20)} if cache_mb else {}
  # Flat class sampling, as the official run below (ILSVRC replicas too).
  options["use_dag_ontology"] = False
  if num_workers:
    it = mdp.make_episode_iterator(specs, "TRAIN", cfg, image_size, seed=0,
                                   num_workers=num_workers, **options)
  elif len(specs) == 1:
    it = mdp.make_one_source_episode_dataset(
        specs[0], "TRAIN", cfg, image_size, seed=0,
        **options).as_numpy_iterator()
  else:
    it = mdp.make_multisource_episode_dataset(
        specs, "TRAIN", cfg, image_size, seed=0,
        **options).as_numpy_iterator()
  build = time.perf_counter() - start
  result = _measure(
      it, lambda e: int(e["support_mask"].sum() + e["query_mask"].sum()),
      seconds, warmup_seconds)
  if hasattr(it, "close"):
    it.close()
  del it
  result["build_seconds"] = build
  if cache_mb:
    # Share of the measured episodes' images served from the cache without
    # reading their record (a lower bound on the hit rate). Counted since
    # the start, so dominated by the measured window only after warm-up.
    result["cache_mb"] = cache_mb
    result["warmup_seconds"] = warmup_seconds
    result["cached_share_since_start"] = reads["cached"] / max(
        1, reads["cached"] + reads["read"])
  return result


def _official(sources, image_size, seconds, official_src, gin_path):
  stubs = tempfile.mkdtemp()
  os.makedirs(os.path.join(stubs, "simclr"))
  for name in ("__init__.py", "data_util.py"):
    open(os.path.join(stubs, "simclr", name), "w").close()
  sys.path[:0] = [official_src, gin_path, stubs]
  import gin  # pylint: disable=g-import-not-at-top
  sys.modules["gin.tf"] = gin  # gin.tf needs tf.estimator, gone from TF.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from meta_dataset.data import config  # pylint: disable=g-import-not-at-top
  from meta_dataset.data import dataset_spec  # pylint: disable=g-import-not-at-top
  from meta_dataset.data import learning_spec  # pylint: disable=g-import-not-at-top
  from meta_dataset.data import pipeline  # pylint: disable=g-import-not-at-top
  # Upstream's data_config.gin decoders (augmentations of zero strength).
  bindings = []
  for scope, on in (("support", True), ("query", False)):
    bindings += [
        f"process_episode.{scope}_decoder = @{scope}/ImageDecoder()",
        f"{scope}/ImageDecoder.data_augmentation = "
        f"@{scope}/DataAugmentation()",
        f"{scope}/DataAugmentation.enable_jitter = {on}",
        f"{scope}/DataAugmentation.jitter_amount = 0",
        f"{scope}/DataAugmentation.enable_gaussian_noise = {on}",
        f"{scope}/DataAugmentation.gaussian_noise_std = 0.0"]
  gin.parse_config(bindings)
  cfg = config.EpisodeDescriptionConfig(
      num_ways=None, num_support=None, num_query=None, min_ways=5,
      max_ways_upper_bound=50, max_num_query=10, max_support_set_size=500,
      max_support_size_contrib_per_class=100, min_log_weight=np.log(0.5),
      max_log_weight=np.log(2), ignore_dag_ontology=False,
      ignore_bilevel_ontology=False, ignore_hierarchy_probability=0.0,
      simclr_episode_fraction=0.0)
  start = time.perf_counter()
  specs = [dataset_spec.load_dataset_spec(str(RECORDS / s)) for s in sources]
  kwargs = dict(split=learning_spec.Split.TRAIN, episode_descr_config=cfg,
                shuffle_buffer_size=1000, read_buffer_size_bytes=1048576,
                num_prefetch=64, image_size=image_size)
  bilevel = [s.name == "omniglot" for s in specs]
  if len(specs) == 1:
    ds = pipeline.make_one_source_episode_pipeline(
        specs[0], use_dag_ontology=False, use_bilevel_ontology=bilevel[0],
        **kwargs)
  else:
    ds = pipeline.make_multisource_episode_pipeline(
        specs, use_dag_ontology_list=[False] * len(specs),
        use_bilevel_ontology_list=bilevel, **kwargs)
  it = iter(ds)
  build = time.perf_counter() - start
  result = _measure(it, lambda e: int(e[0][0].shape[0] + e[0][3].shape[0]),
                    seconds)
  return {**result, "build_seconds": build}


def _index_bench(num_files, num_records, record_bytes):
  """Seconds to count the records of a synthetic split (build-time check)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import reader  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as root:
    payload = os.urandom(record_bytes)
    paths = [os.path.join(root, f"{c}.tfrecords") for c in range(num_files)]
    for path in paths:
      with tf.io.TFRecordWriter(path) as writer:
        for _ in range(num_records):
          writer.write(payload)
    times = []
    for _ in range(3):
      reader._INDEX_CACHE.clear()  # pylint: disable=protected-access
      start = time.perf_counter()
      for c, path in enumerate(paths):
        reader.check_record_count(path, num_records, c)
      times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for c, path in enumerate(paths):  # Again: cached per file.
      reader.check_record_count(path, num_records, c)
    again = time.perf_counter() - start
  return {"files": num_files, "records_per_file": num_records,
          "record_bytes": record_bytes, "seconds": times,
          "cached_seconds": again, "load": os.getloadavg()[0]}


def _worker(args):
  sources = args.sources.split(",")
  if args.worker in ("ours", "ours_cache", "ours_workers"):
    result = _ours(sources, args.image_size, args.seconds,
                   args.cache_mb if args.worker == "ours_cache" else 0,
                   args.warmup_seconds if args.worker == "ours_cache" else 0,
                   args.num_workers if args.worker == "ours_workers" else 0)
  else:
    result = _official(sources, args.image_size, args.seconds,
                       args.official_src, args.gin_path)
  print("RESULT " + json.dumps(result))


def _spawn(impl, sources, size, args):
  cmd = [sys.executable, __file__, "--worker", impl, "--sources",
         ",".join(sources), "--image_size", str(size), "--seconds",
         str(args.seconds), "--cache_mb", str(args.cache_mb),
         "--warmup_seconds", str(args.warmup_seconds),
         "--records_root", str(RECORDS), "--num_workers",
         str(args.num_workers)]
  if impl == "official":
    cmd += ["--official_src", args.official_src, "--gin_path", args.gin_path]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  load = os.getloadavg()[0]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines:
    raise RuntimeError(f"{impl} {sources} {size} failed:\n{out.stderr[-3000:]}")
  return {**json.loads(lines[-1][len("RESULT "):]), "load_before": load,
          "load_after": os.getloadavg()[0]}


def _machine():
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [l.split(":", 1)[1].strip() for l in f if "model name" in l]
      cpu = names[0] if names else cpu
  except OSError:
    pass
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {"cpu": cpu, "cores": os.cpu_count(), "python":
          platform.python_version(), "tensorflow": tf.__version__}


def main():
  global RECORDS  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="84,126,224")
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--official_src")
  parser.add_argument("--gin_path")
  parser.add_argument("--output", default="pipeline_bench.json")
  parser.add_argument("--cache_mb", type=float, default=1024,
                      help="decoded_cache_bytes of the ours_cache runs, MiB "
                      "(0: no ours_cache runs)")
  parser.add_argument("--warmup_seconds", type=float, default=20.0,
                      help="warm-up of the ours_cache runs before measuring")
  parser.add_argument("--index_bench", metavar="FILES,RECORDS,BYTES",
                      help="only time the build-time record count check on "
                      "a synthetic split, e.g. 1000,100,2000")
  parser.add_argument("--cases", default="omniglot;dtd;omniglot,dtd",
                      help="';'-separated source lists")
  parser.add_argument("--records_root", default=str(RECORDS),
                      help="folder of the sources (default: the shared "
                      "fixtures; e.g. a benchmarks/replica_data.py replica)")
  # Internal: one measurement in this process.
  parser.add_argument("--worker", choices=["ours", "ours_cache",
                                           "ours_workers", "official"])
  parser.add_argument("--sources")
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--num_workers", type=int, default=0,
                      help="also run ours with this many worker processes "
                      "(impl 'ours_workers')")
  args = parser.parse_args()
  RECORDS = pathlib.Path(args.records_root)
  if args.index_bench:
    files, records, size = (int(x) for x in args.index_bench.split(","))
    result = _index_bench(files, records, size)
    print(json.dumps(result))
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    return
  if args.worker:
    _worker(args)
    return
  impls = (["ours"] + (["ours_cache"] if args.cache_mb else [])
           + (["ours_workers"] if args.num_workers else [])
           + (["official"] if args.official_src else []))
  cases = [tuple(c.split(",")) for c in args.cases.split(";")]
  rows = []
  for size in [int(s) for s in args.sizes.split(",")]:
    for sources in cases:
      runs = {impl: [] for impl in impls}
      for _ in range(args.rounds):  # Implementations interleaved.
        for impl in impls:
          runs[impl].append(_spawn(impl, sources, size, args))
      best = {}
      for impl in impls:
        rates = [r["images_per_s"] for r in runs[impl]]
        best[impl] = max(runs[impl], key=lambda r: r["images_per_s"])
        rows.append({"impl": impl, "sources": "+".join(sources),
                     "image_size": size, **best[impl],
                     "median_images_per_s": float(statistics.median(rates)),
                     "rounds": runs[impl]})
      line = f"{'+'.join(sources):13s} {size:4d}"
      for impl in impls:
        line += (f" | {impl} {best[impl]['episodes_per_s']:6.2f} ep/s "
                 f"{best[impl]['images_per_s']:7.0f} img/s")
      if "official" in best:
        for impl in impls[:-1]:
          line += (f" | {impl}/official x" + format(
              best[impl]["images_per_s"] / best["official"]["images_per_s"],
              ".2f"))
      print(line, flush=True)
  result = {"machine": _machine(), "seconds_per_measurement": args.seconds,
            "rounds": args.rounds, "rows": rows}
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
