"""The programs a run compiles, and their padded FLOPs, without compiling.

For a config and device counts, prints the padded shapes of training and
evaluation (`ctx_jax/data/compile_plan.py`), the number of step programs
they allow (the bound the compile budget is about) and how many occur over
sampled episodes, before issue 22 (every evaluated source and split fits its
own buckets) and after (one shared list of evaluation shapes), and the
expected padded-FLOPs overhead (padded / unpadded FLOPs of the episodes,
from the FLOP polynomial of `padding_flops_bench.json`: the ResNet-34 CTX
train step at 224 px, XLA's counts; the eval step is the forward pass only,
about a third of it, with the same structure, so its ratio is used for
evaluation too). Nothing is compiled: the sampler and the fit only.

  python benchmarks/compile_plan_bench.py --config experiments/ctx_ilsvrc.py \
      --num_devices 1,8,16 [--specs ../shared/fixtures/official_specs/...] \
      [--output benchmarks/compile_plan_bench.json]

Episodes counted: 600 per evaluated source and split (the eval protocol;
validation repeats the same 600 episodes), 20,000 training episodes.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from ctx_jax.data import compile_plan
from meta_dataset_pipeline import dataset_spec
from meta_dataset_pipeline import sampling

# pylint: enable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = os.path.join(HERE, '..', '..', 'shared', 'fixtures',
                     'official_specs', 'dataset_specs')
EVAL_EPISODES, TRAIN_EPISODES, MD_WAYS = 600, 20000, 50


def load_config(path):
  spec = importlib.util.spec_from_file_location('experiment_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def spec_loader(specs_dir):
  cache = {}

  def load(source):
    if source not in cache:
      cache[source] = dataset_spec.load_dataset_spec(
          os.path.join(specs_dir, f'{source}_dataset_spec.json'))
    return cache[source]
  return load


def flop_model(path):
  coef = np.array(json.load(open(path))['flop_model']['coefficients'])

  def flops(s, q, w):
    s, q, w = (np.asarray(x, np.float64) for x in (s, q, w))
    return coef @ np.stack([np.ones_like(s), s, q, w, s * q, q * w, s * w])
  return flops


def sample_sizes(episode_cfg, pair, load, count, seed=123):
  """(S, Q, ways) of `count` episodes of one source and split."""
  cfg = sampling.EpisodeDescriptionConfig(**episode_cfg.to_dict())
  sampler = sampling.EpisodeDescriptionSampler(load(pair[0]), pair[1], cfg,
                                               seed=seed)
  out = []
  for _ in range(count):
    d = sampler.sample_episode_description()
    out.append((int(d.num_support.sum()), int(d.num_query.sum()),
                len(d.class_ids)))
  return np.array(out)


def padded_cost(buckets, sizes, flops, max_ways):
  pad = np.array([buckets.pick(s, q) for s, q, _ in sizes])
  padded = flops(pad[:, 0], pad[:, 1], np.minimum(max_ways, pad[:, 0]))
  real = flops(sizes[:, 0], sizes[:, 1], sizes[:, 2])
  return {tuple(p) for p in pad}, float(padded.sum()), float(real.sum())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, action='append')
  parser.add_argument('--num_devices', default='1,8,16')
  parser.add_argument('--specs', default=SPECS)
  parser.add_argument('--flops', default=os.path.join(
      HERE, 'padding_flops_bench.json'))
  parser.add_argument('--output')
  args = parser.parse_args()
  load, flops = spec_loader(args.specs), flop_model(args.flops)
  report = []
  for path in args.config:
    config = load_config(path)
    name = os.path.splitext(os.path.basename(path))[0]
    pairs = compile_plan.eval_sources(config)
    eval_sizes = {p: sample_sizes(config.data.eval_episode, p, load,
                                  EVAL_EPISODES) for p in pairs}
    train_cfg = sampling.EpisodeDescriptionConfig(
        **config.data.train_episode.to_dict())
    rng = np.random.default_rng(0)
    train_samplers = [sampling.EpisodeDescriptionSampler(
        load(s), 'TRAIN', train_cfg, seed=123)
                      for s in config.data.train_sources]
    train_sizes = []
    for _ in range(TRAIN_EPISODES):
      d = train_samplers[rng.integers(len(train_samplers))
                         ].sample_episode_description()
      train_sizes.append((int(d.num_support.sum()), int(d.num_query.sum()),
                          len(d.class_ids)))
    train_sizes = np.array(train_sizes)
    for n in [int(x) for x in args.num_devices.split(',')]:
      start = time.perf_counter()
      plan = compile_plan.plan(config, load, n)
      seen, pad, real = padded_cost(plan.train, train_sizes, flops, MD_WAYS)
      row = {'config': name, 'num_devices': n,
             'train': {'support': plan.train.support,
                       'query': plan.train.query,
                       'programs_bound': plan.train.num_programs,
                       'programs_seen': len(seen),
                       'flops_overhead': pad / real},
             'eval_before': {}, 'eval_after': {}}
      for label, get in (('eval_before', plan.per_source_eval.get),
                         ('eval_after', lambda _: plan.eval)):
        total_seen, tot_pad, tot_real, per_source = 0, 0.0, 0.0, {}
        shapes = set()
        for pair in pairs:
          seen, pad, real = padded_cost(get(pair), eval_sizes[pair], flops,
                                        MD_WAYS)
          shapes |= seen
          total_seen += len(seen)
          tot_pad, tot_real = tot_pad + pad, tot_real + real
          per_source['/'.join(pair)] = {'programs_seen': len(seen),
                                        'flops_overhead': pad / real}
        bound = (sum(get(p).num_programs for p in pairs)
                 if label == 'eval_before' else plan.eval.num_programs)
        # Before, each source and split compiled its own shapes (different
        # buckets are different programs); after, they share one list.
        row[label] = {'programs_bound': bound,
                      'programs_seen': (total_seen if label == 'eval_before'
                                        else len(shapes)),
                      'flops_overhead': tot_pad / tot_real,
                      'per_source': per_source}
      if plan.eval is not None:
        row['eval_after']['shapes'] = plan.eval.pairs
      row['programs_per_run'] = {
          'before_seen': (row['train']['programs_seen']
                          + row['eval_before']['programs_seen']),
          'after_seen': (row['train']['programs_seen']
                         + row['eval_after']['programs_seen']),
          'after_bound': plan.programs_bound}
      report.append(row)
      worst = max(v['flops_overhead']
                  for v in row['eval_after']['per_source'].values())
      print(f"{name} on {n} device(s): train {row['train']['programs_seen']}"
            f"/{row['train']['programs_bound']} programs (seen/bound), FLOPs "
            f"{row['train']['flops_overhead']:.3f}x; eval before "
            f"{row['eval_before']['programs_seen']} programs, FLOPs "
            f"{row['eval_before']['flops_overhead']:.3f}x; eval after "
            f"{row['eval_after']['programs_seen']}/"
            f"{row['eval_after']['programs_bound']} programs, FLOPs "
            f"{row['eval_after']['flops_overhead']:.3f}x (worst source "
            f"{worst:.3f}x); per run: before "
            f"{row['programs_per_run']['before_seen']}, after "
            f"{row['programs_per_run']['after_seen']} seen, at most "
            f"{plan.programs_bound} ({time.perf_counter() - start:.0f} s)",
            flush=True)
      print(f"  train: support buckets {plan.train.support} x query buckets "
            f"{plan.train.query}", flush=True)
      if plan.eval is not None:
        print(f"  eval (S, Q) shapes: {list(plan.eval.pairs)}", flush=True)
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
