"""Where the train step's time goes: every convolution of ResNet-34 (stride
16) timed in XLA:CPU and in TensorFlow's oneDNN kernels.

For an image size and a batch (default 200 images: episode b's support +
query), each distinct convolution of the official backbone (stem, the 3x3
convs of every stage, the strided first convs, the 1x1 projections, the
dilated conv5_x convs) is timed forward, backward to the input and backward
to the filter, and the times are multiplied by how often the shape occurs,
giving the convolution time of one training step (the stem's input gradient
is not needed and not counted).

  python benchmarks/conv_kernels_bench.py --framework jax --xla_flags default
  python benchmarks/conv_kernels_bench.py --framework jax --xla_flags eigen
  TF_ENABLE_ONEDNN_OPTS=1 <official venv>/bin/python \\
      benchmarks/conv_kernels_bench.py --framework tf

(`--xla_flags default` is jaxlib's own choice, YNNPACK convolutions on
jaxlib 0.10 to 0.12; `eigen` and the other names are the settings of
`ctx_jax.xla_config.CPU_CONV_SETTINGS`, the candidates of its per-jaxlib
table; `--extra_flags` adds raw XLA flags to try others). Run it with the
Python of each supported jaxlib to fill that table. Each run prints a table
and appends one JSON line (with the jaxlib and Python versions and the load)
to --output. Medians of 5 runs per kernel after a warm-up; wall-clock
seconds, and CPU seconds (`cpu_totals`).
"""

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
# pylint: disable=g-import-not-at-top,wrong-import-position
from ctx_jax import xla_config  # main() sets XLA_FLAGS before JAX starts.
# pylint: enable=g-import-not-at-top,wrong-import-position


def layers(size):
  """Distinct convs of ResNet-34 stride 16 at `size` px: name, input hw,
  cin, cout, kernel, stride, dilation, occurrences."""
  stem_out = -(-size // 2)
  s2 = -(-stem_out // 2)          # conv2_x (after the max-pool)
  s3 = -(-s2 // 2)                # conv3_x
  s4 = -(-s3 // 2)                # conv4_x; conv5_x keeps it (dilated)
  return [
      ('stem 7x7/2', size, 3, 64, 7, 2, 1, 1),
      ('conv2 3x3', s2, 64, 64, 3, 1, 1, 6),
      ('conv2 proj 1x1', s2, 64, 64, 1, 1, 1, 1),
      ('conv3 3x3/2', s2, 64, 128, 3, 2, 1, 1),
      ('conv3 proj 1x1/2', s2, 64, 128, 1, 2, 1, 1),
      ('conv3 3x3', s3, 128, 128, 3, 1, 1, 7),
      ('conv4 3x3/2', s3, 128, 256, 3, 2, 1, 1),
      ('conv4 proj 1x1/2', s3, 128, 256, 1, 2, 1, 1),
      ('conv4 3x3', s4, 256, 256, 3, 1, 1, 11),
      ('conv5 3x3 in', s4, 256, 512, 3, 1, 1, 1),
      ('conv5 proj 1x1', s4, 256, 512, 1, 1, 1, 1),
      ('conv5 3x3 rate 2', s4, 512, 512, 3, 1, 2, 5),
  ]


def median_time(fn, repeats=5):
  """Median wall-clock seconds of `fn()`; its median CPU seconds (all
  threads of this process, steadier than wall time on a shared machine)
  are appended to `CPU_TIMES`."""
  fn()
  times, cpu = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  CPU_TIMES.append(statistics.median(cpu))
  return statistics.median(times)


CPU_TIMES = []


def jax_kernels(batch, hw, cin, cout, k, stride, rate):
  """(fwd, bwd-input, bwd-filter) seconds in XLA:CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, (stride, stride), 'SAME', rhs_dilation=(rate, rate),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
  g = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, w).shape)
  fwd = jax.jit(conv)
  bwd_in = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  bwd_w = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  run = lambda f, *a: lambda: jax.block_until_ready(f(*a))
  return (median_time(run(fwd, x, w)), median_time(run(bwd_in, x, w, g)),
          median_time(run(bwd_w, x, w, g)))


def tf_kernels(batch, hw, cin, cout, k, stride, rate):
  """(fwd, bwd-input, bwd-filter) seconds in TensorFlow (oneDNN)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.random.normal((batch, hw, hw, cin))
  w = tf.random.normal((k, k, cin, cout)) * 0.05
  y = tf.nn.conv2d(x, w, stride, 'SAME', dilations=rate)
  g = tf.random.normal(y.shape)
  strides, dil = [1, stride, stride, 1], [1, rate, rate, 1]
  fwd = tf.function(lambda: tf.nn.conv2d(x, w, stride, 'SAME',
                                         dilations=rate))
  bwd_in = tf.function(lambda: tf.compat.v1.nn.conv2d_backprop_input(
      x.shape, w, g, strides, 'SAME', dilations=dil))
  bwd_w = tf.function(lambda: tf.compat.v1.nn.conv2d_backprop_filter(
      x, w.shape, g, strides, 'SAME', dilations=dil))
  run = lambda f: lambda: f().numpy()
  return (median_time(run(fwd)), median_time(run(bwd_in)),
          median_time(run(bwd_w)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--framework', choices=('jax', 'tf'), required=True)
  parser.add_argument(
      '--xla_flags', default='eigen',
      choices=['default'] + sorted(xla_config.CPU_CONV_SETTINGS))
  parser.add_argument('--extra_flags', default='',
                      help='more XLA flags (JAX side), to try other kernels')
  parser.add_argument('--sizes', type=int, nargs='+', default=[84, 126])
  parser.add_argument('--batch', type=int, default=200)
  parser.add_argument('--output', default=os.path.join(
      HERE, 'conv_kernels_bench.jsonl'))
  args = parser.parse_args()
  if args.framework == 'jax':
    # Before JAX starts: exactly one of the two settings, nothing else.
    os.environ['CTX_JAX_XLA_DEFAULTS'] = '0'
    flag = xla_config.CPU_CONV_SETTINGS.get(args.xla_flags) or ''
    os.environ['XLA_FLAGS'] = f'{flag} {args.extra_flags}'.strip()
    label = f'XLA:CPU ({" ".join([args.xla_flags, args.extra_flags]).strip()})'
    kernels = jax_kernels
    versions = {'jaxlib': xla_config.jaxlib_version()}
  else:
    label = 'TensorFlow oneDNN'
    kernels = tf_kernels
    versions = {'tensorflow': importlib.metadata.version('tensorflow-cpu')}
  versions['python'] = platform.python_version()
  with open('/proc/cpuinfo') as f:
    versions['machine'] = next(
        (line.split(':', 1)[1].strip() for line in f
         if line.startswith('model name')), platform.machine())
  versions['machine'] += f', {os.cpu_count()} CPUs'
  for size in args.sizes:
    load = os.getloadavg()
    rows, totals, cpu_totals = [], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    print(f'{label}, {size} px, batch {args.batch}', flush=True)
    for name, hw, cin, cout, k, stride, rate, count in layers(size):
      del CPU_TIMES[:]
      times = kernels(args.batch, hw, cin, cout, k, stride, rate)
      cpu = list(CPU_TIMES)
      if name.startswith('stem'):
        times = (times[0], 0.0, times[2])  # No input gradient for images.
        cpu[1] = 0.0
      for i in range(3):
        totals[i] += count * times[i]
        cpu_totals[i] += count * cpu[i]
      rows.append({'layer': name, 'hw': hw, 'count': count,
                   'fwd_s': times[0], 'bwd_input_s': times[1],
                   'bwd_filter_s': times[2], 'cpu_s': cpu})
      print(f'  {name:18s} {hw:3d}px x{count:2d}  fwd {times[0]:.3f}  '
            f'bwd-in {times[1]:.3f}  bwd-filter {times[2]:.3f}', flush=True)
    print(f'  per step: fwd {totals[0]:.2f} s, bwd-in {totals[1]:.2f} s, '
          f'bwd-filter {totals[2]:.2f} s, total {sum(totals):.2f} s '
          f'({sum(cpu_totals):.2f} CPU-s)',
          flush=True)
    with open(args.output, 'a') as f:
      f.write(json.dumps({'framework': label, 'size': size,
                          'batch': args.batch, 'load': os.getloadavg(),
                          'load_before': load, **versions,
                          'totals': totals, 'cpu_totals': cpu_totals,
                          'rows': rows}) + '\n')


if __name__ == '__main__':
  sys.exit(main())
