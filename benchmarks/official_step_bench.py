"""Our train step against the official TF step, side by side on one machine.

Episodes (as `shared/tools/official_step_bench/`): (a) the official fixture
episode (5-way, 13 support + 9 query, 84 px), (b) 20-way 100 + 100 at
84 px, (c) the same at 126 px (`make_episodes.py` there writes b and c),
and the eval-mode forward pass of (b). Weights: the fixture checkpoint,
imported with `ctx-import-official` for our side. Each measurement is a
fresh process; rounds interleave official and ours, case by case, and the
report gives the median over rounds of each side's median step time.

Our side runs the default `shard_map` step with the official recipe
(`experiments/common.py`: Adam 6e-4, normalised GD, weight decay, BN EMA),
compiled once ahead of time with the state donated, in three forms:
`unpadded` (exact rows, logits for the real ways, 1 device), `padded` (the
rows and logit width the pipeline gives this episode under the ILSVRC
training config's buckets: `config.data.num_buckets` fitted buckets; for
eval, those of the ILSVRC test split with the eval episode config) and
`padded, 2 devices` (the same split over 2 XLA:CPU devices).

  python benchmarks/official_step_bench.py \
      --official_python /tmp/offvenv/bin/python --official_src /tmp/offsrc \
      --episodes_dir /tmp/eps --export /tmp/official_export --rounds 2

(see shared/tools/official_step_bench/README.md for the official side's
set-up). Writes benchmarks/official_step_bench.json, prints the table.
`--jax "LABEL=PYTHON,..."` runs our side with each of several JAX
installations (one venv per Python/JAX) in every round, `LABEL=PYTHON:eigen`
or `:jaxlib` forcing an XLA:CPU convolution setting, and `--variants
unpadded` keeps only that variant (benchmarks/RESULTS.md, "Supported JAX
versions", has the command).
`--worker` times our side once (one process).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, '..', 'shared')
HARNESS = os.path.join(SHARED, 'tools', 'official_step_bench',
                       'official_bench.py')
MAX_WAYS = 50  # The ILSVRC configs' logit width before `logit_width`.


def load_episode(path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(path) as f:
    return {k: f[k] for k in f}


def pad_rows(x, rows):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:],
                                     x.dtype)])


def worker(args):
  """Our step on one episode: compile once, warm up, time `--steps`."""
  if args.conv_setting:
    # One of ctx_jax.xla_config.CPU_CONV_SETTINGS, instead of the default.
    sys.path.insert(0, ROOT)
    from ctx_jax import xla_config  # pylint: disable=g-import-not-at-top
    os.environ['CTX_JAX_XLA_DEFAULTS'] = '0'
    os.environ['XLA_FLAGS'] = (
        xla_config.CPU_CONV_SETTINGS[args.conv_setting] or '')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from flax import nnx
  import numpy as np

  from ctx_jax import mesh as mesh_lib
  from ctx_jax import xla_config  # Sets the default XLA flags.
  from ctx_jax.checkpoints import export
  from ctx_jax.models import episode as episode_lib
  from ctx_jax.training import optim
  from ctx_jax.training import sharded_step
  from experiments import common

  # pylint: enable=g-import-not-at-top
  ep = load_episode(args.episode)
  num_support, num_query = len(ep['support_labels']), len(ep['query_labels'])
  s_pad = max(args.support_rows, num_support)
  q_pad = max(args.query_rows, num_query)
  episode = {
      'support_images': pad_rows(ep['support_images'], s_pad),
      'support_labels': pad_rows(ep['support_labels'].astype(np.int32),
                                 s_pad),
      'support_mask': np.arange(s_pad) < num_support,
      'query_images': pad_rows(ep['query_images'], q_pad),
      'query_labels': pad_rows(ep['query_labels'].astype(np.int32), q_pad),
      'query_mask': np.arange(q_pad) < num_query}
  num_ways = args.ways or int(ep['support_labels'].max()) + 1
  config = common.get_base_config()
  mesh = mesh_lib.make_mesh(args.devices)
  train_fn, eval_fn = sharded_step.select_steps('shard_map', mesh)
  with jax.set_mesh(mesh):
    model, _ = export.load_exported_model(args.export, mesh=mesh)
    optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer),
                              wrt=nnx.Param)
    wd = float(config.optimizer.weight_decay)
    graphdef, state = nnx.split((model, optimizer))

    def pure(state, episode):
      model, optimizer = nnx.merge(graphdef, state)
      if args.mode == 'train':
        model.train()
        metrics = train_fn(model, optimizer, episode, num_ways, wd)
      else:
        model.eval()
        metrics = eval_fn(model, episode, num_ways)
      return nnx.state((model, optimizer)), metrics

    dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
    start = time.perf_counter()
    compiled = jax.jit(pure, donate_argnums=0).lower(state, dev).compile()
    compile_s = time.perf_counter() - start
    times, cpu, losses, first = [], [], [], None
    for i in range(args.warmup + args.steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      state, metrics = compiled(state, dev)
      metrics = jax.device_get(metrics)
      if i >= args.warmup:
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
      losses.append(float(metrics.get('total_loss', metrics['loss'])))
      if i == 0:
        first = {k: float(v) for k, v in metrics.items()}
  print(json.dumps({
      'jax': jax.__version__, 'jaxlib': xla_config.jaxlib_version(),
      'python': platform.python_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'conv_setting': (args.conv_setting or
                       xla_config.applied().get('setting')),
      'median_s': statistics.median(times), 'times': times,
      'cpu_s': statistics.median(cpu), 'compile_s': compile_s,
      'losses': losses, 'first': first, 'rows': [s_pad, q_pad],
      'ways': min(num_ways, s_pad), 'devices': args.devices}))


def padded_rows(episode_path, mode, pad_multiple, specs_dir, num_buckets):
  """(S, Q) rows the pipeline gives this episode under the ILSVRC config."""
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from experiments import common
  from meta_dataset_pipeline import dataset_spec
  from meta_dataset_pipeline import padding
  from meta_dataset_pipeline import sampling

  # pylint: enable=g-import-not-at-top
  ep = load_episode(episode_path)
  config = common.get_base_config()
  episode_cfg = (config.data.train_episode if mode == 'train'
                 else config.data.eval_episode)
  spec = dataset_spec.load_dataset_spec(
      os.path.join(specs_dir, 'ilsvrc_2012_dataset_spec.json'))
  sampler = sampling.EpisodeDescriptionSampler(
      spec, 'TRAIN' if mode == 'train' else 'TEST',
      sampling.EpisodeDescriptionConfig(**episode_cfg.to_dict()))
  buckets = padding.buckets_for_samplers([sampler], pad_multiple,
                                         num_buckets=num_buckets)
  return buckets.pick(len(ep['support_labels']), len(ep['query_labels']))


def machine_name():
  """The CPU model and count (from /proc/cpuinfo where there is one)."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} CPUs'


def run_json(cmd, env=None):
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env=env)
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def run_official(args, episode, mode):
  env = dict(os.environ, OFFICIAL_SRC=args.official_src,
             TF_ENABLE_ONEDNN_OPTS='1', TF_CPP_MIN_LOG_LEVEL='2')
  out_path = os.path.join(args.tmp, f'official_{os.getpid()}.json')
  _, stdout = run_json([args.official_python, HARNESS, '--episode', episode,
                        '--mode', mode, '--warmup', str(args.warmup),
                        '--steps', str(args.steps), '--output', out_path],
                       env)
  with open(out_path) as f:
    result = json.load(f)
  result['losses'] = [float(line.rsplit('loss', 1)[1])
                      for line in stdout.splitlines()
                      if line.startswith('step ')]
  return result


def run_ours(args, episode, mode, rows, devices, ways, python=None,
             conv_setting=''):
  cmd = [python or sys.executable, os.path.abspath(__file__), '--worker',
         '--conv_setting', conv_setting,
         '--episode', episode, '--mode', mode, '--export', args.export,
         '--warmup', str(args.warmup), '--steps', str(args.steps),
         '--devices', str(devices), '--support_rows', str(rows[0]),
         '--query_rows', str(rows[1]), '--ways', str(ways)]
  return run_json(cmd)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--episode')
  parser.add_argument('--mode', default='train', choices=('train', 'eval'))
  parser.add_argument('--export', default='/tmp/official_export',
                      help='ctx-import-official of the fixture checkpoint')
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument('--support_rows', type=int, default=0)
  parser.add_argument('--query_rows', type=int, default=0)
  parser.add_argument('--ways', type=int, default=0)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--official_python', default='/tmp/offvenv/bin/python')
  parser.add_argument('--official_src', default='/tmp/offsrc')
  parser.add_argument('--episodes_dir', default='/tmp/eps')
  parser.add_argument('--specs', default=os.path.join(
      SHARED, 'fixtures', 'official_specs', 'dataset_specs'))
  parser.add_argument('--num_buckets', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--cases', default='a,b,c,b_eval')
  parser.add_argument(
      '--variants', default='',
      help='only these of ours (separated by ";": unpadded, padded, '
      '"padded, 2 devices"); default all')
  parser.add_argument(
      '--jax', default='',
      help='compare JAX installations: comma-separated LABEL=PYTHON or '
      'LABEL=PYTHON:SETTING (SETTING one of xla_config.CPU_CONV_SETTINGS '
      'instead of the default), each running our side of every variant; '
      'default: this Python, default setting')
  parser.add_argument('--conv_setting', default='',
                      help='(worker) XLA:CPU convolution setting to force')
  parser.add_argument('--tmp', default='/tmp')
  parser.add_argument('--output', default=os.path.join(
      HERE, 'official_step_bench.json'))
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  fixture = os.path.join(SHARED, 'fixtures', 'official_ctx', 'episode.npz')
  cases = {'a': (fixture, 'train'),
           'b': (os.path.join(args.episodes_dir, 'episode_b.npz'), 'train'),
           'c': (os.path.join(args.episodes_dir, 'episode_c.npz'), 'train'),
           'b_eval': (os.path.join(args.episodes_dir, 'episode_b.npz'),
                      'eval')}
  chosen = args.cases.split(',')
  variants = {}
  for name in chosen:
    path, mode = cases[name]
    variants[name] = [('unpadded', (0, 0), 1, 0)]
    for devices in ((1, 2) if name in ('b', 'b_eval') else (1,)):
      rows = padded_rows(path, mode, devices, args.specs, args.num_buckets)
      label = 'padded' if devices == 1 else f'padded, {devices} devices'
      variants[name].append((label, rows, devices, MAX_WAYS))
  if args.variants:
    keep = [v.strip() for v in args.variants.split(';')]
    variants = {k: [v for v in vs if v[0] in keep]
                for k, vs in variants.items()}
  installs = [('', None, '')]
  if args.jax:
    installs = []
    for item in args.jax.split(','):
      jax_label, python = item.split('=', 1)
      python, _, setting = python.partition(':')
      installs.append((jax_label, python, setting))
  results = {name: {'official': []} for name in chosen}
  for round_index in range(args.rounds):
    for name in chosen:
      path, mode = cases[name]
      load = os.getloadavg()[0]
      official = run_official(args, path, mode)
      official['load_before'] = load
      results[name]['official'].append(official)
      print(f"round {round_index} {name}: official {official['median_s']:.3f}"
            f" s (load {load:.1f})", flush=True)
      for label, rows, devices, ways in variants[name]:
        for jax_label, python, setting in installs:
          load = os.getloadavg()[0]
          ours = run_ours(args, path, mode, rows, devices, ways, python,
                          setting)
          ours['load_before'] = load
          key = f'{label} [{jax_label}]' if jax_label else label
          results[name].setdefault(key, []).append(ours)
          print(f"round {round_index} {name}: ours {key} {rows} "
                f"{ours['median_s']:.3f} s (load {load:.1f})", flush=True)
  table = []
  for name in chosen:
    row = {'case': name}
    for label, runs in results[name].items():
      row[label] = statistics.median(r['median_s'] for r in runs)
    table.append(row)
    cells = '  '.join(f'{k} {v:.2f}' for k, v in row.items() if k != 'case')
    print(f'{name:7s} {cells}', flush=True)
  report = {'load_average_end': os.getloadavg(), 'cpu_count': os.cpu_count(),
            'machine': machine_name(),
            'jax': {label: python for label, python, _ in installs},
            'rounds': args.rounds, 'steps': args.steps,
            'warmup': args.warmup, 'num_buckets': args.num_buckets,
            'variants': {k: [v[:2] for v in vs] for k, vs in
                         variants.items()},
            'table': table, 'runs': results}
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
