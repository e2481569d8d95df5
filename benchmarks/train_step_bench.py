"""Throughput, memory and FLOP utilisation of the CTX train step.

For each episode (presets: `a` 5-way 13+9 at 84 px, `b` 20-way 100+100 at
84 px, `c` the same at 126 px, `largest` the paper's largest, 500+500 at
224 px with 50 ways; or `--support/--query/--ways/--sizes`), device count
(`--device_counts`, e.g. `1,all`), step implementation (`shard_map`:
explicit collectives, ctx_jax/training/sharded_step.py; `gspmd`: the
jit-partitioned step, ctx_jax/training/train_step.py) and compute dtype
(float32, bfloat16), the train step on one fixed synthetic episode (all
rows real, padded to a multiple of the devices) is compiled ahead of time
and run --steps times. Needs no TensorFlow (accelerator hosts may lack it):
episodes are numpy, the model and optimiser are built from the config
without the training loop's input pipeline. Reported:

* episodes/s and images/s (median step time; images = S + Q);
* compile time (lower + compile of the whole step);
* peak memory: on GPU/TPU `device.memory_stats()['peak_bytes_in_use']` after
  the run (a process-wide high-water mark, so it never decreases from one row
  to the next: run one case per process for exact figures); on CPU the
  compiled `memory_analysis()` (arguments + outputs + temporaries - aliased);
* FLOPs per device and model FLOPs utilisation (MFU): XLA's `cost_analysis()`
  counts a while-loop body once, so the FLOPs are taken from a second
  compile of the float32 shard_map step whose CTX head processes all local
  queries in one chunk (one loop iteration); they include the head's
  rematerialised forward pass. MFU = FLOPs per device / step time / peak
  FLOP/s of one device (table below for H100/H200/A100/TPU v4/v5e, float32
  rows against the TF32/default-precision peak; or --peak_tflops);
* the effect of bfloat16 on the loss: |loss_bf16 - loss_f32| of the first
  step (same episode, same initial parameters).

Usage (an accelerator host: every preset, 1 device and all devices):
  python benchmarks/train_step_bench.py --episodes a,b,c,largest \
      --device_counts 1,all
CPU at a small setting:
  python benchmarks/train_step_bench.py --episodes a --device_counts 1 \
      --parallelism shard_map --steps 3
Prints a table and writes JSON to --output.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from flax import nnx
import jax
import numpy as np

# Run as a script from anywhere: the repo root holds `experiments`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from ctx_head_bench import cpu_name  # A sibling script (benchmarks/).

# pylint: disable=g-import-not-at-top,wrong-import-position
from ctx_jax import mesh as mesh_lib
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import sharded_step
from ctx_jax.training import state as state_lib
from experiments import common

# pylint: enable=g-import-not-at-top,wrong-import-position

# name: (support, query, ways, image size); the episodes of
# benchmarks/official_step_bench.py plus the paper's largest episode.
EPISODES = {
    'a': (13, 9, 5, 84),
    'b': (100, 100, 20, 84),
    'c': (100, 100, 20, 126),
    'largest': (500, 500, 50, 224),
}

# Peak dense FLOP/s per device in TFLOP/s: (bfloat16, float32 as XLA runs it
# by default: TF32 tensor cores on NVIDIA, bfloat16 passes on TPU).
PEAK_TFLOPS = {
    'H200': (989.0, 494.7),
    'H100': (989.0, 494.7),  # SXM; PCIe parts are ~25% lower: use the flag.
    'A100': (312.0, 156.0),
    'TPU v4': (275.0, 275.0),
    'TPU v5 lite': (197.0, 197.0),  # v5e.
    'TPU v5e': (197.0, 197.0),
}


def peak_tflops(device_kind: str, dtype: str, override: float | None):
  """Peak TFLOP/s of one device for `dtype`, or None if unknown."""
  if override:
    return override
  for name, (bf16, f32) in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


def make_config(args, size: int, dtype: str, parallelism: str,
                chunk_size: int | None = None):
  """The base CTX config with the benchmark's model and episode."""
  config = common.get_base_config()
  config.data.image_size = size
  config.model.backbone = args.backbone
  config.model.head = args.head
  config.model.dtype = dtype
  config.model.init = 'he'
  if args.max_stride is not None:
    config.model.max_stride = args.max_stride
  if chunk_size:
    config.model.query_chunk_size = chunk_size
  config.train.parallelism = parallelism
  return config


def make_episode(episode, num_devices: int):
  """One fixed random episode, padded to a multiple of the devices."""
  support, query, ways, size = episode
  pad = lambda n: -(-n // num_devices) * num_devices
  rng = np.random.default_rng(0)

  def part(rows, real):
    # The real rows do not depend on the padding (the device count).
    images = np.zeros((rows, size, size, 3), np.float32)
    images[:real] = rng.uniform(-1, 1, (real, size, size, 3))
    labels = np.where(np.arange(rows) < real, np.arange(rows) % ways, 0)
    return images, labels.astype(np.int32), np.arange(rows) < real

  s_img, s_lab, s_mask = part(pad(support), support)
  q_img, q_lab, q_mask = part(pad(query), query)
  return {'support_images': s_img, 'support_labels': s_lab,
          'support_mask': s_mask, 'query_images': q_img,
          'query_labels': q_lab, 'query_mask': q_mask}


def pure_train_step(config, mesh, graphdef, num_ways: int):
  """(state, episode) -> (state, metrics): the configured step, train mode.

  `state` is `nnx.state((model, optimizer))` of the split `graphdef`.
  """
  train_fn, _ = sharded_step.select_steps(config.train.parallelism, mesh)
  wd = float(config.optimizer.weight_decay)

  def pure(state, episode):
    model, optimizer = nnx.merge(graphdef, state)
    model.train()
    metrics = train_fn(model, optimizer, episode, num_ways, wd)
    return nnx.state((model, optimizer)), metrics

  return pure


def lowered_flops(config, mesh, episode, num_ways: int) -> float | None:
  """XLA's FLOP count of the lowered (not compiled) train step.

  Lowering needs no memory for the episode or the one-chunk head (the
  paper's largest episode would not fit), and the state is abstract.
  `episode`: arrays on `mesh` or `jax.ShapeDtypeStruct`s. Under shard_map
  the body has per-device shapes, so the count is per device.
  """
  graphdef, state = nnx.split(state_lib.abstract_train_state(config))
  pure = pure_train_step(config, mesh, graphdef, num_ways)
  with jax.set_mesh(mesh):
    analysis = jax.jit(pure).lower(state, episode).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def compile_step(config, mesh, episode, num_ways):
  """AOT-compiled pure step (state, episode) -> (state, metrics) and state."""
  graphdef, state = nnx.split(state_lib.create_train_state(config, mesh))
  pure = pure_train_step(config, mesh, graphdef, num_ways)
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(pure, donate_argnums=0).lower(state, dev).compile()
  return compiled, state, dev, time.perf_counter() - start


def compiled_memory(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes +
             m.temp_size_in_bytes - m.alias_size_in_bytes)


def run_case(args, mesh, episode_spec, parallelism, dtype):
  """Compiles and times one case; returns its row."""
  support, query, ways, size = episode_spec
  config = make_config(args, size, dtype, parallelism)
  episode = make_episode(episode_spec, mesh.size)
  compiled, state, dev, compile_s = compile_step(config, mesh, episode, ways)
  times, first_loss = [], None
  for i in range(args.steps + 1):  # The first run is a warm-up.
    start = time.perf_counter()
    state, metrics = compiled(state, dev)
    metrics = jax.device_get(metrics)
    if i == 0:
      first_loss = float(metrics['loss'])
    else:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  if device.platform == 'cpu':
    memory, memory_kind = compiled_memory(compiled), 'compiled'
  else:
    stats = device.memory_stats() or {}
    memory, memory_kind = stats.get('peak_bytes_in_use'), 'peak_in_use'
  num_images = support + query
  return dict(size=size, support=support, query=query, ways=ways,
              parallelism=parallelism, dtype=dtype,
              devices=mesh.size, step_s=step_s, episodes_per_s=1 / step_s,
              images_per_s=num_images / step_s, compile_s=compile_s,
              memory_bytes=memory, memory_kind=memory_kind,
              first_loss=first_loss, last_loss=float(metrics['loss']))


def count_flops(args, mesh, episode_spec):
  """FLOPs per device of the float32 step, CTX head in one chunk."""
  _, query, ways, size = episode_spec
  local_queries = -(-query // mesh.size)
  config = make_config(args, size, 'float32', 'shard_map',
                       chunk_size=local_queries)
  episode = mesh_lib.shard_episode(make_episode(episode_spec, mesh.size),
                                   mesh, episode_lib.MODEL_INPUT_KEYS)
  return lowered_flops(config, mesh, episode, ways)


def parse_episodes(args):
  """{name: (support, query, ways, size)} from --episodes or --support..."""
  if args.episodes:
    unknown = sorted(set(args.episodes.split(',')) - set(EPISODES))
    if unknown:
      raise SystemExit(f'train_step_bench: error: unknown episodes {unknown}'
                       f'; known: {sorted(EPISODES)}')
    return {name: EPISODES[name] for name in args.episodes.split(',')}
  return {f'{args.support}+{args.query}@{size}': (args.support, args.query,
                                                  args.ways, size)
          for size in args.sizes}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--episodes', default='',
                      help=f'comma-separated presets of {sorted(EPISODES)}; '
                      'default: --support/--query/--ways at each --sizes')
  parser.add_argument('--sizes', type=int, nargs='+', default=[84, 224])
  parser.add_argument('--parallelism', nargs='+',
                      default=['shard_map', 'gspmd'],
                      choices=('shard_map', 'gspmd'))
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'],
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--backbone', default='resnet34')
  parser.add_argument('--head', default='ctx', choices=('ctx', 'protonet'))
  parser.add_argument('--max_stride', type=int, default=None,
                      help='default: the config default (16)')
  parser.add_argument('--support', type=int, default=50)
  parser.add_argument('--query', type=int, default=50)
  parser.add_argument('--ways', type=int, default=10)
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps per case (after one warm-up)')
  parser.add_argument('--device_counts', default='all',
                      help="comma-separated mesh sizes, 'all' = every device")
  parser.add_argument('--cpu_devices', type=int, default=2,
                      help='on CPU, fake devices to split the episode over')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='peak TFLOP/s of one device (overrides the table)')
  parser.add_argument('--no_flops', action='store_true',
                      help='skip the extra lowering that counts FLOPs')
  parser.add_argument('--output', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'train_step_bench.json'))
  args = parser.parse_args()
  episodes = parse_episodes(args)
  # Before any backend starts; only the CPU backend reads it.
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  counts = [jax.device_count() if c == 'all' else int(c)
            for c in args.device_counts.split(',')]
  device_kind = jax.devices()[0].device_kind
  print(f'{jax.device_count()} x {device_kind}, backbone {args.backbone}, '
        f'head {args.head}', flush=True)
  rows = []
  header = (f'{"episode":>12} {"dev":>3} {"step":>9} {"dtype":>8} '
            f'{"ep/s":>7} {"img/s":>7} {"step s":>7} {"compile s":>9} '
            f'{"mem MiB":>8} {"GFLOP/dev":>9} {"MFU":>6} {"loss":>9} '
            f'{"|dloss| bf16":>12}')
  print(header, flush=True)
  for num_devices in dict.fromkeys(counts):
    mesh = mesh_lib.make_mesh(num_devices)
    for name, spec in episodes.items():
      flops = None if args.no_flops else count_flops(args, mesh, spec)
      f32_loss = {}
      for parallelism in args.parallelism:
        for dtype in args.dtypes:
          row = run_case(args, mesh, spec, parallelism, dtype)
          row['episode'] = name
          row['flops_per_device'] = flops
          peak = peak_tflops(device_kind, dtype, args.peak_tflops)
          row['peak_tflops'] = peak
          row['mfu'] = (flops / row['step_s'] / (peak * 1e12)
                        if flops and peak else None)
          if dtype == 'float32':
            f32_loss[parallelism] = row['first_loss']
          ref = f32_loss.get(parallelism)
          row['loss_diff_vs_f32'] = (abs(row['first_loss'] - ref)
                                     if ref is not None else None)
          rows.append(row)
          mem = (f'{row["memory_bytes"] / 2**20:.0f}'
                 if row['memory_bytes'] is not None else '?')
          gflop = f'{flops / 1e9:.1f}' if flops else '?'
          mfu = (f'{100 * row["mfu"]:.1f}%' if row['mfu'] is not None
                 else 'n/a')
          diff = (f'{row["loss_diff_vs_f32"]:.2e}' if dtype != 'float32'
                  and row['loss_diff_vs_f32'] is not None else '')
          print(f'{name:>12} {mesh.size:>3} {parallelism:>9} {dtype:>8} '
                f'{row["episodes_per_s"]:>7.3f} {row["images_per_s"]:>7.1f} '
                f'{row["step_s"]:>7.3f} {row["compile_s"]:>9.1f} {mem:>8} '
                f'{gflop:>9} {mfu:>6} {row["first_loss"]:>9.4f} {diff:>12}',
                flush=True)
  report = {
      'machine': {'platform': platform.platform(), 'processor': cpu_name(),
                  'cpu_count': os.cpu_count(),
                  'load_average': os.getloadavg(),
                  'jax_backend': jax.default_backend(),
                  'device': device_kind, 'num_devices': jax.device_count(),
                  'jax': jax.__version__,
                  'xla_flags': os.environ.get('XLA_FLAGS', '')},
      'backbone': args.backbone, 'head': args.head,
      'episodes': episodes, 'steps': args.steps, 'rows': rows,
  }
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
