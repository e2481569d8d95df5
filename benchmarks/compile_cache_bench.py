"""First-step time of a restarted run, with and without the compile cache.

A restarted (resumed, preempted) run compiles its train step again before
the first step. With JAX's persistent compilation cache (on by default,
`config.compilation_cache_dir`, ctx_jax/xla_config.py) it loads the
compiled step instead. For each config, three fresh processes run one train
step on a fake episode of the config's shapes: `cold` (empty cache folder),
`warm` (the same folder again: what a restart sees) and `off` (cache off).
Reported: seconds from the start of the step call to its result (the
compile or load included), and the cache events JAX recorded.

  python benchmarks/compile_cache_bench.py

Writes benchmarks/compile_cache_bench.json. `--worker` runs one process
(also used by tests/compile_cache_test.py).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = {
    # The demo's training step (resnet_tiny, 48 px, 5-way 5+5).
    'demo': dict(config='experiments/demo.py', support=25, query=25, ways=5),
    # The paper model on episode (a) of the official comparison.
    'resnet34 84px 13+9': dict(config='experiments/ctx_ilsvrc.py', size=84,
                               support=13, query=9, ways=5),
}


def worker(args):
  """One process: enable the cache (or not), time one train step."""
  sys.path.insert(0, ROOT)
  # pylint: disable=g-import-not-at-top
  import importlib.util

  import jax
  from jax import monitoring

  from ctx_jax import mesh as mesh_lib
  from ctx_jax import xla_config
  from ctx_jax.models import episode as episode_lib
  from ctx_jax.training import sharded_step
  from ctx_jax.training import state as state_lib
  from tests import fakes

  # pylint: enable=g-import-not-at-top
  events = []
  monitoring.register_event_listener(
      lambda name, **kw: events.append(name.rsplit('/', 1)[-1])
      if 'compilation_cache' in name else None)
  xla_config.enable_compilation_cache(args.cache_dir)
  path, _, arg = args.config.partition(':')
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT,
                                                                     path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  if args.size:
    config.data.image_size = args.size
  mesh = mesh_lib.make_mesh(1)
  model, optimizer = state_lib.create_train_state(config, mesh)
  model.train()
  episode = fakes.fake_episode(args.support, args.query, args.ways,
                               image_size=config.data.image_size)
  episode = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  train_fn, _ = sharded_step.select_steps(config.train.parallelism, mesh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    metrics = train_fn(model, optimizer, episode, args.ways,
                       float(config.optimizer.weight_decay))
    loss = float(jax.device_get(metrics['loss']))
  seconds = time.perf_counter() - start
  print(json.dumps({'first_step_s': seconds, 'loss': loss,
                    'cache_hits': events.count('cache_hits'),
                    'cache_misses': events.count('cache_misses')}))


def run_worker(case, cache_dir):
  cmd = [sys.executable, os.path.abspath(__file__), '--worker',
         '--config', case['config'], '--cache_dir', cache_dir,
         '--support', str(case['support']), '--query', str(case['query']),
         '--ways', str(case['ways']), '--size', str(case.get('size', 0))]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--worker', action='store_true')
  parser.add_argument('--config', default='experiments/demo.py')
  parser.add_argument('--cache_dir', default='none')
  parser.add_argument('--support', type=int, default=25)
  parser.add_argument('--query', type=int, default=25)
  parser.add_argument('--ways', type=int, default=5)
  parser.add_argument('--size', type=int, default=0)
  parser.add_argument('--output', default=os.path.join(
      HERE, 'compile_cache_bench.json'))
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  rows = []
  for name, case in CASES.items():
    with tempfile.TemporaryDirectory() as cache_dir:
      cold = run_worker(case, cache_dir)
      warm = run_worker(case, cache_dir)
    off = run_worker(case, 'none')
    rows.append({'case': name, 'cold': cold, 'warm': warm, 'off': off})
    print(f"{name:20s} first step: no cache {off['first_step_s']:.1f} s, "
          f"cold cache {cold['first_step_s']:.1f} s, warm cache (restart) "
          f"{warm['first_step_s']:.1f} s ({warm['cache_hits']} hits, "
          f"{warm['cache_misses']} misses)", flush=True)
  report = {'load_average': os.getloadavg(), 'cpu_count': os.cpu_count(),
            'rows': rows}
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
