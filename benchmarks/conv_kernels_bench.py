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

(`--xla_flags default` is jaxlib's own choice, YNNPACK convolutions;
`eigen` is what `ctx_jax` sets, `xla_config.CPU_CONV_FLAG`). Each run
prints a table and appends one JSON line to --output. Medians of 5 runs per
kernel after a warm-up; wall-clock seconds.
"""

import argparse
import json
import os
import statistics
import sys
import time

# (name, input spatial at 84 px as a fraction key, in channels, out
# channels, kernel, stride, dilation, count in the backbone).
EIGEN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


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
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


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
  parser.add_argument('--xla_flags', choices=('default', 'eigen'),
                      default='eigen')
  parser.add_argument('--sizes', type=int, nargs='+', default=[84, 126])
  parser.add_argument('--batch', type=int, default=200)
  parser.add_argument('--output', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'conv_kernels_bench.jsonl'))
  args = parser.parse_args()
  if args.framework == 'jax':
    # Before JAX starts: exactly one of the two settings, nothing else.
    os.environ['CTX_JAX_XLA_DEFAULTS'] = '0'
    os.environ['XLA_FLAGS'] = EIGEN_FLAG if args.xla_flags == 'eigen' else ''
    label = f'XLA:CPU ({args.xla_flags})'
    kernels = jax_kernels
  else:
    label = 'TensorFlow oneDNN'
    kernels = tf_kernels
  for size in args.sizes:
    rows, totals = [], [0.0, 0.0, 0.0]
    print(f'{label}, {size} px, batch {args.batch}', flush=True)
    for name, hw, cin, cout, k, stride, rate, count in layers(size):
      times = kernels(args.batch, hw, cin, cout, k, stride, rate)
      if name.startswith('stem'):
        times = (times[0], 0.0, times[2])  # No input gradient for images.
      for i in range(3):
        totals[i] += count * times[i]
      rows.append({'layer': name, 'hw': hw, 'count': count,
                   'fwd_s': times[0], 'bwd_input_s': times[1],
                   'bwd_filter_s': times[2]})
      print(f'  {name:18s} {hw:3d}px x{count:2d}  fwd {times[0]:.3f}  '
            f'bwd-in {times[1]:.3f}  bwd-filter {times[2]:.3f}', flush=True)
    print(f'  per step: fwd {totals[0]:.2f} s, bwd-in {totals[1]:.2f} s, '
          f'bwd-filter {totals[2]:.2f} s, total {sum(totals):.2f} s',
          flush=True)
    with open(args.output, 'a') as f:
      f.write(json.dumps({'framework': label, 'size': size,
                          'batch': args.batch, 'load': os.getloadavg(),
                          'totals': totals, 'rows': rows}) + '\n')


if __name__ == '__main__':
  sys.exit(main())
