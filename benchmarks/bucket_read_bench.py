"""Reading an episode's records from a bucket: walk + per-record vs sidecar.

    python benchmarks/bucket_read_bench.py [--latency_ms 30] \\
        [--bandwidth_mb 100] [--block_mb 0,1,4] [--gaps 0,262144,1048576]

Writes `--classes` class files of `--records` records of about
`--record_kb` KB (random bytes, with their sidecar indexes) and uploads
them to the loopback Cloud Storage emulator of `tests/gcs_emulator.py`,
whose proxy adds `--latency_ms` to every request and caps each connection
at `--bandwidth_mb` MB/s, as a real bucket would. Then, for every
`GCS_READ_CACHE_BLOCK_SIZE_MB` of `--block_mb` (TensorFlow reads it at
import: one worker process per value), `--threads` threads each take
`--take` random records of one class, as an episode does:

- `probe`: the requests and bytes of single GFile reads (12 bytes, one
  record, 2 MB) at that block size;
- `walk_before`: the path before sidecars: `record_files.index_records`
  (the whole file in 16 MiB windows, read through a GFile's 512 KiB
  buffer) then `read_record` per record on one open GFile;
- `walk`: the same with today's `index_records` (one ranged read per
  16 MiB window), as when a file has no valid sidecar;
- `sidecar_gap<N>`: `load_record_offsets` (the sidecar: one small read),
  then `read_records` with `max_gap=N` (records fewer than N bytes apart
  read together).

Reported per phase: wall seconds, records/s, requests and reply bytes
counted at the proxy. Every phase must return the same bytes. The JSON
(`--output`, default next to this file) also records the machine's load:
the emulator is pure Python on the same cores, so absolute figures are the
emulator's; compare phases within a run.
"""

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_OUTPUT = pathlib.Path(__file__).with_suffix(".json")


def _parser():
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 2)[2],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--classes", type=int, default=20)
  parser.add_argument("--records", type=int, default=200,
                      help="records per class")
  parser.add_argument("--record_kb", type=float, default=100)
  parser.add_argument("--take", type=int, default=10,
                      help="records read per class")
  parser.add_argument("--threads", type=int, default=0,
                      help="reading threads (0: one per class)")
  parser.add_argument("--latency_ms", type=float, default=30)
  parser.add_argument("--bandwidth_mb", type=float, default=100,
                      help="MB/s per connection (0: uncapped)")
  parser.add_argument("--block_mb", default="0,1,4",
                      help="GCS_READ_CACHE_BLOCK_SIZE_MB values")
  parser.add_argument("--gaps", default="0,262144,1048576,4194304",
                      help="read_records max_gap values (bytes)")
  parser.add_argument("--skip_walk", action="store_true",
                      help="only the probe and sidecar phases")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--note", default="",
                      help="what else ran on the machine (stored)")
  parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return parser


def _write_data(folder, args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import records_writer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(args.seed)
  mean = int(args.record_kb * 1000)
  for c in range(args.classes):
    sizes = rng.integers(int(mean * 0.8), int(mean * 1.2) + 1, args.records)
    records_writer.write_class_records(
        str(folder), c, (rng.bytes(int(n)) for n in sizes), write_index=True)


def _digest(chunks):
  h = hashlib.sha256()
  for chunk in chunks:
    h.update(bytes(chunk))
  return h.hexdigest()[:16]


class _Link:
  """Worker side of the phase handshake (stdin/stdout JSON lines)."""

  def phase(self, name, fn):
    print(json.dumps({"start": name}), flush=True)
    assert json.loads(sys.stdin.readline())["go"] == name
    start = time.perf_counter()
    result = fn()
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps({"end": name, "result": result}), flush=True)
    assert json.loads(sys.stdin.readline())["ok"] == name


def _worker(args):
  """Runs every phase in this process (TF reads the GCS block size now)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import files  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import record_files  # pylint: disable=g-import-not-at-top

  root = args.worker
  paths = [f"{root}/{c}.tfrecords" for c in range(args.classes)]
  rng = np.random.default_rng(args.seed + 1)
  picks = [rng.choice(args.records, args.take, replace=False)
           for _ in paths]
  link = _Link()
  threads = args.threads or args.classes

  def probe(offset, n):
    def run():
      with tf.io.gfile.GFile(paths[0], "rb") as f:
        f.seek(offset)
        got = len(f.read(n))
      return {"read_bytes": got}
    return run

  for n in (12, int(args.record_kb * 1000), 2 << 20):
    link.phase(f"probe_read_{n}", probe(123457, n))

  def over_classes(one):
    def run():
      record_files._INDEX_CACHE.clear()  # pylint: disable=protected-access
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(one, range(len(paths))))
      return {"records": sum(len(o) for o in out),
              "digest": _digest(r for o in out for r in o)}
    return run

  def walk(c):
    offsets = record_files.index_records(paths[c])
    with files.open_binary(paths[c]) as f:
      return [record_files.read_record(f, int(offsets[i])) for i in picks[c]]

  if not args.skip_walk:
    real_open_ranges = files.open_ranges
    files.open_ranges = files.open_binary  # index_records before sidecars.
    link.phase("walk_before", over_classes(walk))
    files.open_ranges = real_open_ranges
    link.phase("walk", over_classes(walk))
  for gap in [int(g) for g in args.gaps.split(",")]:
    def sidecar(c, gap=gap):
      offsets = record_files.load_record_offsets(paths[c], args.records, c)
      return record_files.read_records(paths[c], picks[c], offsets, c,
                                       max_gap=gap)
    link.phase(f"sidecar_gap{gap}", over_classes(sidecar))


def _run_worker(gcs, root, block_mb, args):
  """One worker process at `block_mb`; returns {phase: result}."""
  env = dict(gcs.env, GCS_READ_CACHE_BLOCK_SIZE_MB=str(block_mb),
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  argv = [sys.executable, __file__, "--worker", root] + [
      f"--{k}={v}" for k, v in vars(args).items()
      if k not in ("worker", "output", "skip_walk", "note")] + (
          ["--skip_walk"] if args.skip_walk else [])
  proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  results = {}
  try:
    for line in proc.stdout:
      msg = json.loads(line)
      if "start" in msg:
        gcs.stats.reset()
        proc.stdin.write(json.dumps({"go": msg["start"]}) + "\n")
        proc.stdin.flush()
      elif "end" in msg:
        result = msg["result"]
        result["requests"] = gcs.stats.requests
        result["reply_bytes"] = gcs.stats.bytes_sent
        result["downloads"] = sum(
            1 for e in gcs.stats.log if e[0] == "GET" and e[2])
        if result.get("records"):
          result["records_per_s"] = result["records"] / result["wall_s"]
        results[msg["end"]] = result
        print(f"block {block_mb} MB {msg['end']}: {result}", flush=True)
        proc.stdin.write(json.dumps({"ok": msg["end"]}) + "\n")
        proc.stdin.flush()
  finally:
    proc.stdin.close()
    if proc.wait() != 0:
      raise RuntimeError(f"worker failed with status {proc.returncode}")
  return results


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.worker:
    _worker(args)
    return
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()
  report = {"args": {k: v for k, v in vars(args).items() if k != "worker"},
            "nproc": os.cpu_count(), "load_before": load_before, "runs": {}}
  with tempfile.TemporaryDirectory(prefix="bucket-bench-") as folder:
    start = time.perf_counter()
    _write_data(folder, args)
    with gcs_emulator.gcs_emulator(
        latency_s=args.latency_ms / 1000,
        bandwidth=args.bandwidth_mb * 1e6 or None) as gcs:
      root = gcs.upload_tree(folder, "bench")
      report["setup_s"] = time.perf_counter() - start
      for block in [b.strip() for b in args.block_mb.split(",")]:
        report["runs"][f"block_{block}MB"] = _run_worker(gcs, root, block,
                                                         args)
  report["load_after"] = os.getloadavg()
  digests = {r.get("digest") for run in report["runs"].values()
             for r in run.values() if "digest" in r}
  report["same_records_in_every_phase"] = len(digests) == 1
  pathlib.Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.output}; load {load_before} -> {report['load_after']}")
  if len(digests) != 1:
    sys.exit("phases returned different records")


if __name__ == "__main__":
  main()
