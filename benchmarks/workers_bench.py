"""Throughput of the episode pipeline with K worker processes.

    python benchmarks/workers_bench.py --records DIR [--workers 0,1,2]
        [--size 224] [--rounds 3] [--seconds 20] [--warmup 4]
        [--start_episode 0] [--output out.json]

Runs `mdp.make_episode_iterator(num_workers=K)` over ILSVRC-style training
episodes of the official config (variable ways and shots, the DAG when the
source has one; no augmentation) of the records under DIR (a replica from
`replica_data.py --natural 500x375x16`, or a gs:// folder), each K in its own
fresh process, the Ks interleaved round by round. Per run it reports:

- `img_per_s`, `episodes_per_s`: real (unpadded) images and episodes handed
  to the consumer per second of wall time, after `--warmup` episodes;
- `consumer_us_per_img`: CPU time of the consuming process per image (for
  K > 0 everything that stays serial: planning, dispatch, ordering,
  hand-over; the workers are other processes), and `serial_ceiling_img_per_s`
  = 1e6 / that: the rate this one process could sustain with unlimited
  workers;
- `worker_us_per_img`: CPU time of the workers per image (read, verify,
  parse, decode, resize, pad, copy into shared memory), from the workers'
  own clocks;
- `first_episode_s`: from building the iterator to the first episode (worker
  start-up included), and the same with `--start_episode` (a resume).

The projection for a host with C cores is computed from the medians:
min(serial ceiling, (C - 2) / worker cost) images/s (one core for the
consumer, one for the training loop and the accelerator runtime). It is a
projection from measured per-image costs, not a measurement at C cores.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# This checkout's packages, not an installed copy's (or `--src`'s, e.g. a
# checkout of an earlier version, for "before" figures).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SRC = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--src=")
             and "--child" in sys.argv),
            ROOT)
sys.path.insert(0, _SRC)

PROJECT_CORES = (16, 48, 96)


def _child(args) -> dict:
  """One measurement in this (fresh) process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  spec = mdp.load_dataset_spec(args.records)
  cfg = mdp.EpisodeDescriptionConfig()
  t0 = time.perf_counter()
  if hasattr(mdp, "make_episode_iterator"):
    it = mdp.make_episode_iterator(spec, "TRAIN", cfg, args.size, seed=0,
                                   num_workers=args.child,
                                   start_episode=args.start_episode)
  else:  # A version before worker processes (`--src`).
    it = mdp.make_one_source_episode_dataset(
        spec, "TRAIN", cfg, args.size, seed=0,
        start_episode=args.start_episode).as_numpy_iterator()
  next(it)
  first = time.perf_counter() - t0
  for _ in range(args.warmup):
    next(it)
  images = episodes = 0
  cpu0, wall0 = time.process_time(), time.perf_counter()
  wcpu0 = getattr(it, "worker_cpu_seconds", 0.0)
  wimg0 = getattr(it, "worker_images", 0)
  while time.perf_counter() - wall0 < args.seconds:
    ep = next(it)
    images += int(np.sum(ep["support_mask"]) + np.sum(ep["query_mask"]))
    episodes += 1
    del ep
  wall = time.perf_counter() - wall0
  cpu = time.process_time() - cpu0
  out = {"num_workers": args.child, "first_episode_s": round(first, 2),
         "start_episode": args.start_episode, "episodes": episodes,
         "images": images, "seconds": round(wall, 2),
         "img_per_s": round(images / wall, 1),
         "episodes_per_s": round(episodes / wall, 2),
         "img_per_episode": round(images / max(episodes, 1), 1),
         "consumer_us_per_img": round(1e6 * cpu / max(images, 1), 2)}
  if args.child:
    out["serial_ceiling_img_per_s"] = round(images / max(cpu, 1e-9))
    wimg = it.worker_images - wimg0
    out["worker_us_per_img"] = round(
        1e6 * (it.worker_cpu_seconds - wcpu0) / max(wimg, 1), 1)
  if hasattr(it, "close"):
    it.close()
  return out


def _run_child(args, k, start_episode=0, src=None, env=None):
  cmd = [sys.executable, os.path.abspath(__file__), "--records",
         args.records, "--size", str(args.size), "--seconds",
         str(args.seconds), "--warmup", str(args.warmup), "--child", str(k),
         "--start_episode", str(start_episode)]
  if src:
    cmd.append(f"--src={src}")
  env = dict(env or os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       check=False)
  if res.returncode:
    raise RuntimeError(f"child K={k} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--records", required=True)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--seconds", type=float, default=20)
  p.add_argument("--warmup", type=int, default=4)
  p.add_argument("--start_episode", type=int, default=0,
                 help="also time the first episode of a resume at this "
                 "episode (K = the largest of --workers)")
  p.add_argument("--resume_only", action="store_true",
                 help="only the resume runs (--start_episode), each "
                 "stopped at its first episode")
  p.add_argument("--output", default="")
  p.add_argument("--src", default="", help="also run K=0 from this "
                 "checkout (an earlier version; labelled 'before')")
  p.add_argument("--gcs_latency_ms", type=float, default=None,
                 help="read from the loopback bucket emulator "
                 "(tests/gcs_emulator.py), with this delay per request")
  p.add_argument("--gcs_bandwidth_mbps", type=float, default=None,
                 help="with --gcs_latency_ms: MB/s per connection")
  p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child is not None:
    print(json.dumps(_child(args)))
    return 0
  if args.gcs_latency_ms is None:
    return _measure(args, dict(os.environ))
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import index_cli  # pylint: disable=g-import-not-at-top
  index_cli.main([args.records])  # Sidecars (skipped when valid).
  bandwidth = (args.gcs_bandwidth_mbps * 1e6 if args.gcs_bandwidth_mbps
               else None)
  with gcs_emulator.gcs_emulator(latency_s=args.gcs_latency_ms / 1000,
                                 bandwidth=bandwidth) as gcs:
    t = time.perf_counter()
    local = args.records
    args.records = gcs.upload_tree(local, "records")
    print(json.dumps({"uploaded": local, "to": args.records,
                      "seconds": round(time.perf_counter() - t, 1)}),
          flush=True)
    env = dict(os.environ, **gcs.env)
    return _measure(args, env, stats=gcs.stats, extra={
        "gcs_latency_ms": args.gcs_latency_ms,
        "gcs_bandwidth_mbps": args.gcs_bandwidth_mbps,
        "records_uploaded_from": local})


def _measure(args, env, stats=None, extra=None):
  """The interleaved rounds, the summary and the projection.

  With `stats` (the emulator proxy's counters), each run also records the
  requests and bytes the bucket served.
  """
  extra = extra or {}

  def child(*a, **kw):
    if stats is not None:
      stats.reset()
    res = _run_child(args, *a, **kw)
    if stats is not None:
      res.update(bucket_requests=stats.requests,
                 bucket_mb=round(stats.bytes_sent / 1e6, 1))
    return res

  env.pop("GCS_READ_CACHE_BLOCK_SIZE_MB", None)  # The pipeline's default.
  # The earlier version's README asked bucket users for 1 MB blocks.
  before_env = dict(env, GCS_READ_CACHE_BLOCK_SIZE_MB="1")
  ks = [int(k) for k in args.workers.split(",")]
  runs = []
  if args.resume_only:  # First episodes only.
    args.seconds, args.warmup = 0, 0
  for r in range(0 if args.resume_only else args.rounds):
    if args.src:
      load = os.getloadavg()[0]
      res = child(0, src=args.src, env=before_env)
      res.update(round=r, load_before=round(load, 2), num_workers="before")
      runs.append(res)
      print(json.dumps(res), flush=True)
    for k in ks:
      load = os.getloadavg()[0]
      res = child(k, env=env)
      res.update(round=r, load_before=round(load, 2))
      runs.append(res)
      print(json.dumps(res), flush=True)
  resumes = []
  if args.start_episode:
    for r in range(args.rounds):
      for label, src, k, e in ((("before", args.src, 0, before_env),)
                               if args.src else ()) + (
                                   (str(max(ks)), None, max(ks), env),):
        res = child(k, args.start_episode, src=src, env=e)
        resumes.append({"version": label,
                        "first_episode_s": res["first_episode_s"],
                        **{k: res[k] for k in ("bucket_requests",
                                               "bucket_mb") if k in res}})
        print(json.dumps(resumes[-1]), flush=True)
  if args.src:
    ks = ["before"] + ks
  summary = {}
  for k in ks:
    mine = [x for x in runs if x["num_workers"] == k]
    if not mine:
      continue
    med = lambda key, mine=mine: statistics.median(x[key] for x in mine)
    row = {"img_per_s": med("img_per_s"),
           "episodes_per_s": med("episodes_per_s"),
           "first_episode_s": med("first_episode_s"),
           "consumer_us_per_img": med("consumer_us_per_img")}
    if k and k != "before":
      row["serial_ceiling_img_per_s"] = med("serial_ceiling_img_per_s")
      row["worker_us_per_img"] = med("worker_us_per_img")
    summary[str(k)] = row
  projection = {}
  with_workers = [summary[str(k)] for k in ks
                  if k and k != "before" and str(k) in summary]
  if with_workers:
    ceiling = max(r["serial_ceiling_img_per_s"] for r in with_workers)
    cost = statistics.median(r["worker_us_per_img"] for r in with_workers)
    for cores in PROJECT_CORES:
      projection[str(cores)] = round(min(ceiling, (cores - 2) * 1e6 / cost))
  out = {"records": args.records, "size": args.size, "rounds": args.rounds,
         "seconds": args.seconds, "machine": platform.processor() or
         platform.machine(), "cpus": os.cpu_count(), "summary": summary,
         "projected_img_per_s": projection,
         "resume_first_episode_s": resumes, "runs": runs, **extra}
  print(json.dumps({"summary": summary, "projected_img_per_s": projection},
                   indent=1))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
