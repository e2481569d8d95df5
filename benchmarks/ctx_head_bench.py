"""Time and memory of the CTX head, chunked+rematerialised versus naive.

For each episode size, the forward and backward pass of the CTX head
(gradients with respect to the support keys and values and the query
queries and values) is compiled with `jax.jit`. We report the compiled
memory (`memory_analysis()`: temp + output bytes, the buffers XLA allocates
beyond the inputs) and the median wall time of a few runs. The naive head
materialises the whole [Q*P, S*J] attention; the chunked head holds one
chunk of queries at a time. Cases whose compiled memory exceeds
--max_run_gib are compiled and analysed but not run.

Default run (about 3 minutes on 2 CPU cores):
  python benchmarks/ctx_head_bench.py
The paper's largest episode (500 support + 500 query images at 224x224, so
14x14 features) is always included as a compile-only case. More sizes:
  python benchmarks/ctx_head_bench.py --sizes 25,25,6 200,200,14
Writes a table to stdout and JSON to --output.

Shape letters: S support, Q queries, W ways, P = J = h*w positions,
D key channels, C value channels.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ctx_jax import models

DEFAULT_SIZES = ('25,25,6', '50,50,6', '100,100,6', '25,25,14', '50,50,14')
PAPER_SIZE = '500,500,14'  # Compile-only: too big to run on a CPU box.
NUM_WAYS = 5
DIMS = 128  # query_dim = val_dim = 128, as the official CTX.


def head_inputs(num_support, num_query, side, dtype, seed=0):
  """Random projected features and labels of one episode."""
  rng = np.random.default_rng(seed)
  positions = side * side
  make = lambda n: jnp.asarray(
      rng.normal(0, 0.3, (n, positions, DIMS)), dtype)
  labels = jnp.asarray(np.arange(num_support) % NUM_WAYS, jnp.int32)
  mask = jnp.ones((num_support,), bool)
  return (make(num_query), make(num_query), make(num_support),
          make(num_support)), labels, mask


def loss_and_grad_fn(head_fn, labels, mask):
  """jit-able f(features) -> (loss, grads) for the head's fwd+bwd pass."""

  def loss(features):
    logits = head_fn(*features, labels, mask, num_ways=NUM_WAYS)
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  return jax.value_and_grad(loss)


def measure(head_fn, size, dtype, repeats, max_run_bytes):
  """Compiled memory and median time of one head on one episode size."""
  num_support, num_query, side = size
  features, labels, mask = head_inputs(num_support, num_query, side, dtype)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          features)
  fn = jax.jit(loss_and_grad_fn(head_fn, labels, mask))
  start = time.perf_counter()
  compiled = fn.lower(abstract).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  memory = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
  result = {'memory_bytes': int(memory), 'compile_s': compile_s,
            'time_s': None}
  if memory <= max_run_bytes:
    jax.block_until_ready(compiled(features))  # Warm-up.
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(features))
      times.append(time.perf_counter() - start)
    result['time_s'] = statistics.median(times)
  return result


def cpu_name():
  """The CPU model from /proc/cpuinfo, else platform.processor()."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', nargs='+', default=list(DEFAULT_SIZES),
                      help='episodes as S,Q,side (features side x side)')
  parser.add_argument('--chunk_size', type=int, default=8)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--max_run_gib', type=float, default=4.0,
                      help='compile-only above this compiled memory')
  parser.add_argument('--output', default='benchmarks/ctx_head_bench.json')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  heads = {
      'chunked': functools.partial(models.crosstransformer_logits,
                                   chunk_size=args.chunk_size),
      'naive': models.crosstransformer_logits_naive,
  }
  sizes = [tuple(int(v) for v in s.split(',')) for s in args.sizes]
  paper = tuple(int(v) for v in PAPER_SIZE.split(','))
  if paper not in sizes:
    sizes.append(paper)
  max_run_bytes = args.max_run_gib * 2**30
  rows = []
  print(f'{"S":>4} {"Q":>4} {"hw":>5} {"head":>8} {"memory MiB":>11} '
        f'{"time s":>8} {"compile s":>9}')
  for size in sizes:
    for name, head_fn in heads.items():
      limit = max_run_bytes if size != paper else 0
      result = measure(head_fn, size, dtype, args.repeats, limit)
      row = dict(support=size[0], query=size[1], positions=size[2]**2,
                 head=name, **result)
      rows.append(row)
      shown = ('not run' if row['time_s'] is None
               else f'{row["time_s"]:.3f}')
      print(f'{size[0]:>4} {size[1]:>4} {size[2]:>2}x{size[2]:<2} '
            f'{name:>8} {row["memory_bytes"] / 2**20:>11.1f} {shown:>8} '
            f'{row["compile_s"]:>9.1f}', flush=True)
  report = {
      'machine': {'platform': platform.platform(),
                  'processor': cpu_name(),
                  'cpu_count': os.cpu_count(),
                  'jax_backend': jax.default_backend(),
                  'device': str(jax.devices()[0].device_kind),
                  'jax': jax.__version__},
      'chunk_size': args.chunk_size, 'dtype': args.dtype,
      'num_ways': NUM_WAYS, 'dims': DIMS, 'rows': rows,
  }
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
