"""Pipeline start-up against dataset size: time to first episode, RSS.

    python benchmarks/replica_data.py --output_dir /tmp/r1 --fraction 0.01
    python benchmarks/startup_bench.py --replicas /tmp/r1,/tmp/r10,/tmp/r100 \
        [--ram 1] [--gcs 1] [--repo DIR] [--episodes 40] [--output out.json]

For each replica of ILSVRC-2012 (`replica_data.py`: the official class
structure, counts scaled, tiny JPEGs) a fresh process, after importing
TensorFlow and the pipeline, times what a training run does before its
first step: load the spec, check every class file of every split
(`mdp.check_sources`, when the checkout has it), build the one-source
training episode pipeline (variable ways/shots through the ILSVRC DAG,
84x84 images) and take the first episode. It then reports episodes/s and
images/s after `--warmup` episodes, and the process's peak RSS.

`--ram N` also runs the first N replicas from TF's in-memory `ram://` file
system (copied there first, not timed; its RSS includes the copy), i.e.
through `tf.io.gfile` as for a `gs://` bucket. `--gcs N` runs them from
`gs://` on the loopback Cloud Storage emulator of `tests/gcs_emulator.py`
(TF's own GCS client, through its TLS proxy; upload not timed). `--repo DIR` runs another
checkout's pipeline (e.g. the code before lazy indexing) for comparison.
The page cache is warm (replicas just written or read): on a cold disk or a
bucket, per-file latencies add to the check's time.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _child(root, ram, episodes, warmup):
  """Runs in a fresh process; prints one JSON line."""
  import resource  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  out = {"import_s": time.perf_counter() - start,
         "pipeline": os.path.dirname(mdp.__file__)}
  if ram:
    start = time.perf_counter()
    target = f"ram://replica/{os.path.basename(root.rstrip('/'))}"
    tf.io.gfile.makedirs(target)
    for name in os.listdir(root):
      tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}")
    out["copy_to_ram_s"] = time.perf_counter() - start
    root = target
  out["root"] = root
  t0 = time.perf_counter()
  spec = mdp.load_dataset_spec(root)
  out["spec_s"] = time.perf_counter() - t0
  if hasattr(mdp, "check_sources"):
    t = time.perf_counter()
    mdp.check_sources([spec], ["TRAIN", "VALID", "TEST"])
    out["check_all_splits_s"] = time.perf_counter() - t
  t = time.perf_counter()
  ds = mdp.make_one_source_episode_dataset(
      spec, "TRAIN", mdp.EpisodeDescriptionConfig(), image_size=84, seed=0)
  it = ds.as_numpy_iterator()
  out["build_s"] = time.perf_counter() - t
  first = next(it)
  out["first_episode_s"] = time.perf_counter() - t0
  del first
  for _ in range(warmup):
    next(it)
  t, images = time.perf_counter(), 0
  for _ in range(episodes):
    ep = next(it)
    images += int(ep["support_mask"].sum() + ep["query_mask"].sum())
  elapsed = time.perf_counter() - t
  out.update(episodes_per_s=episodes / elapsed, images_per_s=images / elapsed,
             peak_rss_mb=resource.getrusage(
                 resource.RUSAGE_SELF).ru_maxrss / 1024,
             records=sum(spec.get_total_images_per_class(c)
                         for s in mdp.Split for c in spec.get_classes(s)))
  print(json.dumps(out))


def _run(repo, root, ram, episodes, warmup, env=None):
  env = dict(env or os.environ, PYTHONPATH=str(repo),
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, __file__, "--child", root, "--child_ram", str(int(ram)),
       "--episodes", str(episodes), "--warmup", str(warmup)],
      env=env, capture_output=True, text=True, check=False, cwd=repo)
  if proc.returncode:
    raise RuntimeError(f"{root}: child failed:\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["load_after"] = os.getloadavg()
  return result


def _run_on_gcs_emulator(args, root):
  """The replica uploaded to the loopback Cloud Storage emulator, read
  through TF's own GCS client (`tests/gcs_emulator.py`)."""
  sys.path.insert(0, str(REPO / "tests"))
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  name = os.path.basename(root.rstrip("/"))
  with gcs_emulator.gcs_emulator() as gcs:
    start = time.perf_counter()
    gcs.upload_tree(root, f"replica/{name}")
    upload_s = time.perf_counter() - start
    env = dict(gcs.env)
    if args.gcs_block_mb >= 0:  # TF's GCS reader fetches this per read.
      env["GCS_READ_CACHE_BLOCK_SIZE_MB"] = str(args.gcs_block_mb)
    result = _run(args.repo, gcs.url(f"replica/{name}"), False,
                  args.episodes, args.warmup, env=env)
  result["upload_to_emulator_s"] = upload_s
  result["gcs_read_cache_block_size_mb"] = (
      args.gcs_block_mb if args.gcs_block_mb >= 0 else "package default")
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--replicas", help="comma-separated replica folders")
  p.add_argument("--ram", type=int, default=0,
                 help="also run the first N replicas from ram://")
  p.add_argument("--gcs", type=int, default=0,
                 help="also run the first N replicas from gs:// on the "
                 "loopback Cloud Storage emulator (tests/gcs_emulator.py)")
  p.add_argument("--gcs_block_mb", type=int, default=-1,
                 help="GCS_READ_CACHE_BLOCK_SIZE_MB for --gcs runs (-1: "
                 "unset, so meta_dataset_pipeline's 0 applies; 64 is TF's "
                 "own default)")
  p.add_argument("--repo", default=str(REPO),
                 help="checkout whose pipeline runs")
  p.add_argument("--episodes", type=int, default=40)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--output")
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--child_ram", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    _child(args.child, args.child_ram, args.episodes, args.warmup)
    return 0
  if not args.replicas:
    p.error("--replicas is required")
  roots = args.replicas.split(",")
  for root in roots:
    if not os.path.isfile(os.path.join(root, "dataset_spec.json")):
      p.error(f"--replicas: {root} holds no dataset_spec.json "
              "(write it with benchmarks/replica_data.py)")
  runs = []
  for i, root in enumerate(roots):
    for ram in (False, True) if i < args.ram else (False,):
      result = _run(args.repo, root, ram, args.episodes, args.warmup)
      runs.append(result)
      print(json.dumps(result), flush=True)
    if i < args.gcs:
      result = _run_on_gcs_emulator(args, root)
      runs.append(result)
      print(json.dumps(result), flush=True)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"machine": platform.platform(), "cpus": os.cpu_count(),
                 "repo": args.repo, "runs": runs}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
