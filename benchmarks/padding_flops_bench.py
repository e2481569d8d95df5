"""Padded-FLOPs overhead of the train step over the official ILSVRC episodes.

What a padding policy costs: XLA's FLOP count (`cost_analysis()`) of one
compiled training step (ResNet-34 stride 16 + CTX head, forward, backward
and update, the `shard_map` step on one device) for the padded shapes the
pipeline emits, against the same episodes unpadded (exact support and query
sizes, logits only for the real ways), averaged over episodes sampled from
the official training distribution of the paper's ILSVRC runs
(variable-way/shot `EpisodeDescriptionConfig` defaults,
`ignore_hierarchy_probability=0.5`, train split of the official
`ilsvrc_2012` dataset spec).

Two kinds of episode: MD episodes (W = the sampled ways, logits padded to
`min(50, S_padded)`) and SimCLR episodes (every support image its own class:
W = S, logits padded to `min(500, S_padded)`); the sizes are the same.

FLOPs of a step are close to a polynomial in (S, Q, W): terms 1, S, Q, W,
S*Q, Q*W, S*W (convolutions and batch norm are linear in the rows, the CTX
attention is S*Q, the distances to the W prototypes and the logits are Q*W).
Lowering every distinct shape would take hours, so the step is lowered for
a few shapes, the polynomial is fitted, and the fit is checked against
shapes it was not fitted on: XLA's counts of reductions and scatters are not
exactly polynomial, and the check must hold to 1e-4 (observed: 6e-5 at
worst) or the run stops; far below the 10% being measured.
The CTX head is lowered with all queries in one chunk (XLA counts a loop
body once); the real step processes `query_chunk_size` queries per chunk,
padding the last chunk, for padded and unpadded episodes alike.

Reported: the ratio of mean FLOPs (padded over unpadded, i.e. the extra
compute of a long run), the mean of the per-episode ratios, the padded-row
fraction, the number of step shapes (programs) seen, per policy: fitted
buckets (`num_buckets` 8, 10, 12: `padding.fitted_buckets`, least mean
relative padding; the default `config.data.num_buckets` is 10) and the
geometric buckets of the first release (growth 1.5).

  python benchmarks/padding_flops_bench.py [--image_size 224] \
      [--episodes 20000] [--specs ../shared/fixtures/official_specs]

Writes benchmarks/padding_flops_bench.json. Takes 2-4 minutes on 2 CPU
cores (the lowerings). Needs TensorFlow (the pipeline's sampler).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import train_step_bench  # A sibling script (benchmarks/).

# pylint: disable=g-import-not-at-top,wrong-import-position
from ctx_jax import mesh as mesh_lib
from experiments import common
from meta_dataset_pipeline import dataset_spec
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import sampling

# pylint: enable=g-import-not-at-top,wrong-import-position

MD_WAYS, SIMCLR_WAYS = 50, 500
# (S, Q, W) shapes to fit and to check the FLOP polynomial on.
FIT_SHAPES = [(5, 5, 5), (40, 50, 5), (100, 50, 20), (200, 300, 20),
              (500, 500, 50), (64, 128, 64), (300, 100, 300),
              (500, 200, 500), (16, 400, 16)]
CHECK_SHAPES = [(77, 130, 33), (488, 424, 488), (250, 250, 9)]


def step_flops(config, size, shape):
  """XLA FLOPs of the train step for S support, Q query rows, W logits."""
  num_support, num_query, num_ways = shape
  config = config.copy_and_resolve_references()
  config.model.query_chunk_size = num_query  # One chunk: counted whole.
  mesh = mesh_lib.make_mesh(1)
  f32 = lambda n: jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
  episode = {'support_images': f32(num_support),
             'support_labels': jax.ShapeDtypeStruct((num_support,), jnp.int32),
             'support_mask': jax.ShapeDtypeStruct((num_support,), jnp.bool_),
             'query_images': f32(num_query),
             'query_labels': jax.ShapeDtypeStruct((num_query,), jnp.int32),
             'query_mask': jax.ShapeDtypeStruct((num_query,), jnp.bool_)}
  return train_step_bench.lowered_flops(config, mesh, episode, num_ways)


def features(shapes):
  s, q, w = np.asarray(shapes, np.float64).T
  return np.stack([np.ones_like(s), s, q, w, s * q, q * w, s * w], axis=1)


def fit_flop_model(config, size):
  """Coefficients of the FLOP polynomial, checked on held-out shapes."""
  start = time.perf_counter()
  flops = [step_flops(config, size, shape) for shape in FIT_SHAPES]
  coef, *_ = np.linalg.lstsq(features(FIT_SHAPES), np.array(flops),
                             rcond=None)
  checks = []
  for shape in CHECK_SHAPES:
    exact = step_flops(config, size, shape)
    predicted = float((features([shape]) @ coef)[0])
    checks.append({'shape': shape, 'exact': exact, 'predicted': predicted,
                   'rel_error': abs(predicted - exact) / exact})
  worst = max(c['rel_error'] for c in checks)
  if worst > 1e-4:
    raise RuntimeError(f'the FLOP polynomial does not fit: {checks}')
  print(f'FLOP model fitted on {len(FIT_SHAPES)} shapes, checked on '
        f'{len(CHECK_SHAPES)} (worst rel. error {worst:.1e}), '
        f'{time.perf_counter() - start:.0f} s', flush=True)
  return coef, checks


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument('--specs', default=os.path.join(
      here, '..', '..', 'shared', 'fixtures', 'official_specs',
      'dataset_specs'))
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--episodes', type=int, default=20000)
  parser.add_argument('--pad_multiple', type=int, default=1)
  parser.add_argument('--output', default=os.path.join(
      here, 'padding_flops_bench.json'))
  args = parser.parse_args()

  config = common.get_base_config()
  spec = dataset_spec.load_dataset_spec(
      os.path.join(args.specs, 'ilsvrc_2012_dataset_spec.json'))
  episode_cfg = sampling.EpisodeDescriptionConfig(
      **config.data.train_episode.to_dict())
  sampler = sampling.EpisodeDescriptionSampler(spec, 'TRAIN', episode_cfg,
                                               seed=12345)
  sizes = []
  for _ in range(args.episodes):
    d = sampler.sample_episode_description()
    sizes.append((int(d.num_support.sum()), int(d.num_query.sum()),
                  len(d.class_ids)))
  sizes = np.array(sizes)
  print(f'{args.episodes} ILSVRC train episodes: mean S {sizes[:, 0].mean():.1f}'
        f', Q {sizes[:, 1].mean():.1f}, ways {sizes[:, 2].mean():.1f}',
        flush=True)
  coef, checks = fit_flop_model(config, args.image_size)
  flops = lambda shapes: features(shapes) @ coef

  policies = {'fitted, 10 buckets (default)': dict(num_buckets=10),
              'fitted, 8 buckets': dict(num_buckets=8),
              'fitted, 12 buckets': dict(num_buckets=12),
              'geometric 1.5 (first release)': dict(num_buckets=0)}
  fit_sampler = sampling.EpisodeDescriptionSampler(spec, 'TRAIN', episode_cfg,
                                                   seed=0)
  rows = []
  for name, kwargs in policies.items():
    buckets = padding.buckets_for_samplers([fit_sampler], args.pad_multiple,
                                           **kwargs)
    padded = np.array([buckets.pick(s, q) for s, q, _ in sizes])
    row = {'policy': name, 'support_buckets': buckets.support,
           'query_buckets': buckets.query,
           'programs_bound': buckets.num_programs,
           'programs_seen': len({tuple(p) for p in padded}),
           'padded_row_fraction': float(1 - sizes[:, :2].sum() /
                                        padded.sum())}
    for kind, max_ways, real_ways in (
        ('md', MD_WAYS, sizes[:, 2]), ('simclr', SIMCLR_WAYS, sizes[:, 0])):
      width = np.minimum(max_ways, padded[:, 0])
      pad_flops = flops(np.stack([padded[:, 0], padded[:, 1], width], 1))
      real_flops = flops(np.stack([sizes[:, 0], sizes[:, 1], real_ways], 1))
      row[f'{kind}_ratio_of_means'] = float(pad_flops.sum() /
                                            real_flops.sum())
      row[f'{kind}_mean_of_ratios'] = float(np.mean(pad_flops / real_flops))
      row[f'{kind}_max_ratio'] = float(np.max(pad_flops / real_flops))
      row[f'{kind}_mean_tflops_unpadded'] = float(real_flops.mean() / 1e12)
    rows.append(row)
    print(f"{name:32s} programs {row['programs_seen']:3d} seen / "
          f"{row['programs_bound']:3d} bound, padded rows "
          f"{100 * row['padded_row_fraction']:.1f}%, FLOPs padded/unpadded: "
          f"MD {row['md_ratio_of_means']:.3f}x (per-episode mean "
          f"{row['md_mean_of_ratios']:.3f}x), SimCLR "
          f"{row['simclr_ratio_of_means']:.3f}x "
          f"({row['simclr_mean_of_ratios']:.3f}x)", flush=True)
  report = {'image_size': args.image_size, 'episodes': args.episodes,
            'pad_multiple': args.pad_multiple,
            'flop_model': {'terms': ['1', 'S', 'Q', 'W', 'S*Q', 'Q*W', 'S*W'],
                           'coefficients': coef.tolist(),
                           'fit_shapes': FIT_SHAPES, 'checks': checks},
            'jax': jax.__version__, 'rows': rows}
  with open(args.output, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
