"""Throughput, memory and FLOP utilisation of the CTX train step.

For each image size, step implementation (`shard_map`: explicit collectives,
ctx_jax/training/sharded_step.py; `gspmd`: the jit-partitioned step,
ctx_jax/training/train_step.py) and compute dtype (float32, bfloat16), the
train step on one fixed episode (S support, Q query images, W ways, all
real) is compiled ahead of time and run --steps times. Reported:

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

Usage (one accelerator, or CPU):
  python benchmarks/train_step_bench.py --sizes 84 224 --support 50 \
      --query 50 --ways 10
CPU at a small setting (what benchmarks/RESULTS.md reports):
  python benchmarks/train_step_bench.py --sizes 84 --backbone resnet34 \
      --support 10 --query 10 --ways 5 --steps 3
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

# Run as a script from anywhere: the repo root holds `experiments` and `tests`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from ctx_jax.training import mesh as mesh_lib
from ctx_jax.training import sharded_step
from ctx_jax.training import train
from ctx_jax.training import train_step as step_lib
from experiments import common
from tests import fakes
from ctx_head_bench import cpu_name  # A sibling script (benchmarks/).
# pylint: enable=g-import-not-at-top,wrong-import-position

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


def make_episode(args, size: int, num_devices: int):
  """One fixed episode, all rows real, padded to a multiple of the devices."""
  pad = lambda n: -(-n // num_devices) * num_devices
  return fakes.fake_episode(pad(args.support), pad(args.query), args.ways,
                            image_size=size, real_support=args.support,
                            real_query=args.query, seed=0)


def compile_step(config, mesh, episode, num_ways):
  """AOT-compiled pure step (state, episode) -> (state, metrics) and state."""

  train_fn, _ = sharded_step.select_steps(config.train.parallelism, mesh)
  model, optimizer = train.create_train_state(config, mesh)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  wd = float(config.optimizer.weight_decay)

  def pure(state, episode):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = train_fn(model, optimizer, episode, num_ways, wd)
    return nnx.state((model, optimizer)), metrics

  dev = mesh_lib.shard_episode(episode, mesh, step_lib.MODEL_INPUT_KEYS)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(pure, donate_argnums=0).lower(state, dev).compile()
  return compiled, state, dev, time.perf_counter() - start


def cost_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def compiled_memory(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes +
             m.temp_size_in_bytes - m.alias_size_in_bytes)


def run_case(args, mesh, size, parallelism, dtype):
  """Compiles and times one case; returns its row."""
  config = make_config(args, size, dtype, parallelism)
  episode = make_episode(args, size, mesh.size)
  compiled, state, dev, compile_s = compile_step(config, mesh, episode,
                                                 args.ways)
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
  num_images = args.support + args.query
  return dict(size=size, parallelism=parallelism, dtype=dtype,
              devices=mesh.size, step_s=step_s, episodes_per_s=1 / step_s,
              images_per_s=num_images / step_s, compile_s=compile_s,
              memory_bytes=memory, memory_kind=memory_kind,
              first_loss=first_loss, last_loss=float(metrics['loss']))


def count_flops(args, mesh, size):
  """FLOPs per device of the float32 step, CTX head in one chunk."""
  local_queries = -(-args.query // mesh.size)
  config = make_config(args, size, 'float32', 'shard_map',
                       chunk_size=local_queries)
  episode = make_episode(args, size, mesh.size)
  compiled, _, _, _ = compile_step(config, mesh, episode, args.ways)
  return cost_flops(compiled)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
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
  parser.add_argument('--num_devices', type=int, default=0,
                      help='devices of the mesh (0: all)')
  parser.add_argument('--cpu_devices', type=int, default=2,
                      help='on CPU, fake devices to split the episode over')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='peak TFLOP/s of one device (overrides the table)')
  parser.add_argument('--no_flops', action='store_true',
                      help='skip the extra compile that counts FLOPs')
  parser.add_argument('--output', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'train_step_bench.json'))
  args = parser.parse_args()
  # Before any backend starts; only the CPU backend reads it.
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  mesh = mesh_lib.make_mesh(args.num_devices or None)
  device_kind = jax.devices()[0].device_kind
  print(f'{mesh.size} x {device_kind}, backbone {args.backbone}, head '
        f'{args.head}, episode S={args.support} Q={args.query} '
        f'W={args.ways}', flush=True)
  rows = []
  header = (f'{"size":>4} {"step":>9} {"dtype":>8} {"ep/s":>7} '
            f'{"img/s":>7} {"step s":>7} {"compile s":>9} {"mem MiB":>8} '
            f'{"GFLOP/dev":>9} {"MFU":>6} {"loss":>9} {"|dloss| bf16":>12}')
  print(header, flush=True)
  for size in args.sizes:
    flops = None if args.no_flops else count_flops(args, mesh, size)
    f32_loss = {}
    for parallelism in args.parallelism:
      for dtype in args.dtypes:
        row = run_case(args, mesh, size, parallelism, dtype)
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
        tflop = f'{flops / 1e9:.1f}' if flops else '?'
        mfu = f'{100 * row["mfu"]:.1f}%' if row['mfu'] is not None else 'n/a'
        diff = (f'{row["loss_diff_vs_f32"]:.2e}'
                if dtype != 'float32' and row['loss_diff_vs_f32'] is not None
                else '')
        print(f'{size:>4} {parallelism:>9} {dtype:>8} '
              f'{row["episodes_per_s"]:>7.3f} {row["images_per_s"]:>7.1f} '
              f'{row["step_s"]:>7.3f} {row["compile_s"]:>9.1f} {mem:>8} '
              f'{tflop:>9} {mfu:>6} {row["first_loss"]:>9.4f} {diff:>12}',
              flush=True)
  report = {
      'machine': {'platform': platform.platform(), 'processor': cpu_name(),
                  'cpu_count': os.cpu_count(),
                  'load_average': os.getloadavg(),
                  'jax_backend': jax.default_backend(),
                  'device': device_kind, 'num_devices': mesh.size,
                  'jax': jax.__version__},
      'backbone': args.backbone, 'head': args.head,
      'episode': {'support': args.support, 'query': args.query,
                  'ways': args.ways},
      'steps': args.steps, 'rows': rows,
  }
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
