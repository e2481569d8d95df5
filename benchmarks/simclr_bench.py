"""SimCLR episodes: pipeline throughput with and without them, TF vs JAX.

    python benchmarks/simclr_bench.py [--sizes 84,224] [--seconds 10]
        [--rounds 2] [--sources omniglot,dtd] [--output simclr_bench.json]

Two tables:

1. Episode pipeline (one source, official variable-way/shot config, shared
   fixture records) in episodes/s and real images/s, for
   - `fraction 0`: no SimCLR episodes (the CTX baseline);
   - `fraction 0.5, tf`: half SimCLR episodes, augmented in the tf.data map;
   - `fraction 0.5, device`: half SimCLR episodes, augmentation left to the
     accelerator (`augment_on_device=True`; the map only decodes);
   - `bohb + 0.5, tf`: as above plus the BOHB augmentation of ordinary
     episodes (CTX+SimCLR Eps+Aug).
   Each measurement runs in a fresh subprocess after one warm-up episode,
   for at least `--seconds`; each cell keeps its best of `--rounds`.
2. Augmentation alone, images/s on batches of `--batch` images: TF (the
   per-image ops of `meta_dataset_pipeline.simclr` under `tf.map_fn` in a
   `tf.function`, as the pipeline runs them) and JAX
   (`ctx_jax.data.augment.augment_batch`, jitted, on JAX's default backend:
   the accelerator when there is one). Support-style views (no blur) and
   query-style views (blur).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pipeline_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORDS = REPO.parent / "shared" / "fixtures" / "md_records"
VARIANTS = {
    "fraction 0": dict(fraction=0.0, device=False, md=None),
    "fraction 0.5, tf": dict(fraction=0.5, device=False, md=None),
    "fraction 0.5, device": dict(fraction=0.5, device=True, md=None),
    "bohb + 0.5, tf": dict(fraction=0.5, device=False, md="bohb"),
}


def _pipeline(source, image_size, variant, seconds):
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  v = VARIANTS[variant]
  spec = mdp.load_dataset_spec(RECORDS / source)
  cfg = mdp.EpisodeDescriptionConfig(simclr_episode_fraction=v["fraction"])
  ds = mdp.make_one_source_episode_dataset(
      spec, "TRAIN", cfg, image_size, seed=0,
      md_augmentation=mdp.augmentation_by_name(v["md"] or "none"),
      augment_on_device=v["device"])
  it = ds.as_numpy_iterator()
  result = pipeline_bench._measure(  # pylint: disable=protected-access
      it, lambda e: int(e["support_mask"].sum() + e["query_mask"].sum()),
      seconds)
  del it
  return result


def _augment_tf(image_size, batch, seconds, blur):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import simclr  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = tf.constant(rng.uniform(-1, 1, (batch, image_size, image_size, 3)),
                       tf.float32)
  spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)

  @tf.function
  def run(images, seeds):
    return tf.map_fn(
        lambda xs: simclr.augment_image(xs[0], xs[1],
                                        simclr.SIMCLR_AUGMENTATION, blur),
        (images, seeds), fn_output_signature=spec)

  def step(i):
    seeds = tf.stack([tf.range(batch, dtype=tf.int64),
                      tf.fill([batch], tf.constant(i, tf.int64))], 1)
    return run(images, seeds).numpy()

  return _time(step, batch, seconds)


def _augment_jax(image_size, batch, seconds, blur):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctx_jax.data import augment  # pylint: disable=g-import-not-at-top
  params = augment.AugmentParams()
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.uniform(
      -1, 1, (batch, image_size, image_size, 3)).astype(np.float32))
  fn = jax.jit(lambda x, key: augment.augment_batch(
      x, jax.random.split(key, x.shape[0]), params, blur))
  step = lambda i: fn(images, jax.random.key(i)).block_until_ready()
  result = _time(step, batch, seconds)
  result["backend"] = jax.default_backend()
  return result


def _time(step, batch, seconds):
  step(0)  # Compile / trace.
  start, n = time.perf_counter(), 0
  while time.perf_counter() - start < seconds or n < 3:
    n += 1
    step(n)
  elapsed = time.perf_counter() - start
  return {"batches": n, "seconds": elapsed,
          "images_per_s": n * batch / elapsed}


def _worker(args):
  if args.worker == "pipeline":
    result = _pipeline(args.source, args.image_size, args.variant,
                       args.seconds)
  else:
    fn = _augment_tf if args.worker == "tf" else _augment_jax
    result = fn(args.image_size, args.batch, args.seconds, args.blur)
  print("RESULT " + json.dumps(result))


def _spawn(args, worker, size, **extra):
  cmd = [sys.executable, __file__, "--worker", worker, "--image_size",
         str(size), "--seconds", str(args.seconds), "--batch",
         str(args.batch)]
  for key, value in extra.items():
    if value is True:
      cmd.append(f"--{key}")
    elif value is not False:
      cmd += [f"--{key}", str(value)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get(
                 "PYTHONPATH", ""))
  if worker != "jax":
    env["CUDA_VISIBLE_DEVICES"] = ""
  out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines:
    raise RuntimeError(f"{worker} {size} {extra} failed:\n"
                       f"{out.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _best(args, worker, size, **extra):
  runs = [_spawn(args, worker, size, **extra) for _ in range(args.rounds)]
  return max(runs, key=lambda r: r["images_per_s"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="84,224")
  parser.add_argument("--sources", default="omniglot,dtd")
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--output", default="simclr_bench.json")
  # Internal: one measurement in this process.
  parser.add_argument("--worker", choices=["pipeline", "tf", "jax"])
  parser.add_argument("--source")
  parser.add_argument("--variant", choices=list(VARIANTS))
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--blur", action="store_true")
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  pipeline_rows, augment_rows = [], []
  print("pipeline (episodes/s | real images/s)")
  print(f"{'source':9s} {'size':>4s}  " + "  ".join(
      f"{v:>22s}" for v in VARIANTS))
  for size in sizes:
    for source in args.sources.split(","):
      cells = []
      for variant in VARIANTS:
        r = _best(args, "pipeline", size, source=source, variant=variant)
        pipeline_rows.append({"source": source, "image_size": size,
                              "variant": variant, **r})
        cells.append(f"{r['episodes_per_s']:7.2f} | "
                     f"{r['images_per_s']:7.0f}")
      print(f"{source:9s} {size:4d}  " + "  ".join(
          f"{c:>22s}" for c in cells), flush=True)
  print(f"\naugmentation alone (images/s, batches of {args.batch})")
  for size in sizes:
    for blur in (False, True):
      row = {"image_size": size, "blur": blur}
      for worker in ("tf", "jax"):
        row[worker] = _best(args, worker, size, blur=blur)
      augment_rows.append(row)
      print(f"size {size:4d} {'query (blur)' if blur else 'support':13s} "
            f"tf {row['tf']['images_per_s']:8.0f}  jax "
            f"({row['jax']['backend']}) {row['jax']['images_per_s']:8.0f}",
            flush=True)
  result = {"machine": pipeline_bench._machine(),  # pylint: disable=protected-access
            "seconds_per_measurement": args.seconds, "rounds": args.rounds,
            "pipeline": pipeline_rows, "augmentation": augment_rows}
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
