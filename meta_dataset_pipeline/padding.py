"""Bucketed padding of episodes, so XLA compiles a bounded set of programs.

Variable-way, variable-shot episodes have support sizes S in [5, 500] and
query sizes Q in [5, 500]. Padding every episode to the maximum would make
the backbone process 1.8x (ILSVRC) to 3.4x (Omniglot) the real rows;
padding to the exact size would compile a new program for almost every
episode. The policy here:

- Support and query sizes are padded independently, each to the smallest
  bucket that fits.
- Fitted buckets (`num_buckets` > 0, the default of the experiment configs:
  `config.data.num_buckets`): at most `num_buckets` sizes per set, chosen by
  an exact dynamic programme (`fitted_buckets`) to minimise the mean
  relative padding (padded rows / real rows) over episodes sampled from the
  samplers themselves (copies, with their own seed), so the buckets follow
  each source's and split's distribution and no episode size is padded to
  many times itself; the last bucket is the largest size the config can
  produce.
- Geometric buckets (`num_buckets` = 0): starting at `min_size`, each is
  `growth` times the previous (rounded up), and the last one is the largest
  size the episode config can produce.
- Every bucket is a multiple of `pad_multiple` (e.g. the device count), so an
  episode's support and query sets split evenly across devices.
- Fixed-shape configs (fixed `num_ways`, an int `num_support` and fixed
  `num_query`) get a single bucket per set: W*K rounded up to `pad_multiple`.
- A training step compiles at most `len(support_buckets) *
  len(query_buckets)` programs (`EpisodeBuckets.num_programs`).

Padding rows are zeros with label 0, class id -1 and mask False.

Measured waste: the fraction of rows (support + query) that are padding,
over 20,000 episodes of the official variable-way/shot config (train split;
multi-source picks a source uniformly), `pad_multiple=1` [and 8]. "programs"
is the bound S-buckets x Q-buckets; "seen" is how many shapes occurred.

| sources            | pad to max | growth 2      | growth 1.5 (default) |
|--------------------|------------|---------------|----------------------|
| ilsvrc_2012        | 44.0%      | 14.4% [15.0%] | 9.3% [10.2%]         |
| omniglot           | 70.4%      | 29.4% [29.6%] | 18.7% [19.6%]        |
| 8 MD train sources | 42.5%      | 17.2% [17.7%] | 11.4% [11.9%]        |
| programs (seen)    | 1          | 49 (19-35)    | 121 [100] (38-81)    |

Growth 1.25 brings waste to 6-11% but allows 361 [225] programs. Fitted
buckets: see `benchmarks/padding_flops_bench.py` and benchmarks/RESULTS.md
("Padding") for their padded rows, programs and the FLOPs of the ResNet-34
CTX train step over the official ILSVRC training episodes.
Reproduce the geometric table with `python -m meta_dataset_pipeline.padding`.
"""

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from meta_dataset_pipeline import dataset_spec
from meta_dataset_pipeline import sampling

DEFAULT_GROWTH = 1.5
DEFAULT_MIN_SIZE = 8


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


def geometric_buckets(max_size: int, min_size: int = DEFAULT_MIN_SIZE,
                      growth: float = DEFAULT_GROWTH,
                      multiple: int = 1) -> tuple[int, ...]:
  """Increasing bucket sizes from `min_size` up to (at least) `max_size`.

  Args:
    max_size: the largest size that must fit.
    min_size: the first bucket (before rounding to `multiple`).
    growth: ratio between consecutive buckets (> 1).
    multiple: every bucket is a multiple of this.

  Returns:
    A tuple of increasing sizes, all multiples of `multiple`; the last one
    is `max_size` rounded up to `multiple`.
  """
  if growth <= 1:
    raise ValueError(f"growth must be > 1, got {growth}")
  if multiple < 1:
    raise ValueError(f"pad_multiple must be >= 1, got {multiple}")
  top = round_up(max(max_size, 1), multiple)
  sizes = []
  size = round_up(max(min(min_size, top), 1), multiple)
  while size < top:
    sizes.append(size)
    size = max(round_up(math.ceil(size * growth), multiple),
               size + multiple)
  # A bucket just below the top one saves little padding but costs a whole
  # extra program; drop it when it is within half a growth step of the top.
  if sizes and top < sizes[-1] * (1 + (growth - 1) / 2):
    sizes.pop()
  sizes.append(top)
  return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class EpisodeBuckets:
  """Allowed padded sizes of the support and query sets.

  Either every pair of a support and a query bucket is allowed (`pairs`
  None), or only the listed `(support, query)` pairs (`fitted_pairs`; then
  `support` and `query` are the sizes the pairs use).
  """
  support: tuple[int, ...]
  query: tuple[int, ...]
  pairs: tuple[tuple[int, int], ...] | None = None

  @property
  def num_programs(self) -> int:
    """Bound on distinct episode shapes (hence compiled train steps)."""
    if self.pairs is not None:
      return len(self.pairs)
    return len(self.support) * len(self.query)

  def pick(self, support_size: int, query_size: int) -> tuple[int, int]:
    """Smallest (support, query) buckets holding the given sizes.

    With `pairs`: the allowed pair holding both sets with the fewest padded
    rows (ties: the smaller support set).
    """
    if self.pairs is None:
      return (_smallest_fit(self.support, support_size, "support"),
              _smallest_fit(self.query, query_size, "query"))
    best = None
    for s, q in self.pairs:
      if s >= support_size and q >= query_size and (
          best is None or (s + q, s) < (best[0] + best[1], best[0])):
        best = (s, q)
    if best is None:
      raise ValueError(f"an episode of {support_size} support and "
                       f"{query_size} query rows exceeds every bucket pair "
                       f"(largest {max(self.pairs)})")
    return best


def _smallest_fit(buckets, size, what):
  i = int(np.searchsorted(buckets, size))
  if i == len(buckets):
    raise ValueError(f"{what} set of {size} rows exceeds the largest "
                     f"bucket {buckets[-1]}")
  return buckets[i]


def fitted_buckets(sizes: Sequence[int], num_buckets: int, max_size: int,
                   multiple: int = 1, relative: bool = False
                   ) -> tuple[int, ...]:
  """The `num_buckets` sizes that minimise the padded rows of `sizes`.

  Exact 1-D optimal quantisation by dynamic programming: every size is
  padded to the smallest bucket that holds it, and the total padding over
  `sizes` (a sample of the sizes an episode config produces) is minimal
  among all choices of at most `num_buckets` buckets that are multiples of
  `multiple` and whose largest is `max_size` rounded up to `multiple` (so
  that every producible size fits, sampled or not).

  Args:
    sizes: observed set sizes (e.g. support sizes of sampled episodes).
    num_buckets: at most this many buckets (>= 1).
    max_size: the largest size that must fit.
    multiple: every bucket is a multiple of this.
    relative: minimise the sum of padding / size (each episode's relative
      overhead) instead of the total padded rows.

  Returns:
    Increasing bucket sizes, the last one `max_size` rounded up.
  """
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
  top = round_up(max(max_size, 1), multiple)
  rounded = np.array([round_up(max(n, 1), multiple) for n in sizes],
                     np.int64)
  if rounded.size and rounded.max() > top:
    raise ValueError(f"a size of {rounded.max()} exceeds max_size {top}")
  # Candidate buckets: the distinct (rounded) sizes seen, and the top.
  values, counts = np.unique(np.append(rounded, top), return_counts=True)
  counts[-1] -= 1  # The appended top is a candidate, not an observation.
  n = len(values)
  weights = counts / values if relative else counts.astype(np.float64)
  cum_weight = np.concatenate([[0], np.cumsum(weights)])
  cum_rows = np.concatenate([[0], np.cumsum(weights * values)])

  def cost(i, j):
    """Padding of candidates i..j (arrays i <= j) all padded to values[j]."""
    return (values[j] * (cum_weight[j + 1] - cum_weight[i]) -
            (cum_rows[j + 1] - cum_rows[i]))

  # best[j]: least padding of candidates 0..j when values[j] is the largest
  # bucket; after layer k, with at most k buckets. back[k][j]: the previous
  # bucket's index, -1 if values[j] is the only bucket, -2 if layer k did
  # not improve on layer k-1 at j (same buckets).
  best = cost(np.zeros(n, np.int64), np.arange(n)).astype(np.float64)
  back = [np.full(n, -1)]
  for _ in range(1, min(num_buckets, n)):
    layer_best, layer_back = best.copy(), np.full(n, -2)
    for j in range(1, n):
      prev = np.arange(j)
      total = best[prev] + cost(prev + 1, np.full(j, j))
      k = int(np.argmin(total))
      if total[k] < layer_best[j]:
        layer_best[j], layer_back[j] = total[k], k
    best = layer_best
    back.append(layer_back)
  buckets, j = [], n - 1
  for layer_back in reversed(back):
    if layer_back[j] == -2:
      continue
    buckets.append(int(values[j]))
    if layer_back[j] == -1:
      break
    j = layer_back[j]
  return tuple(sorted(buckets))


def fitted_pairs(support_sizes: Sequence[int], query_sizes: Sequence[int],
                 num_pairs: int, max_support: int, max_query: int,
                 multiple: int = 1, num_candidates: int = 40
                 ) -> EpisodeBuckets:
  """At most `num_pairs` (support, query) shapes fitted to sampled episodes.

  Support and query sizes are correlated (many ways: both sets large), so a
  list of allowed shapes pads far less than the product of per-set buckets
  with as many programs. Candidates are the products of `num_candidates`
  fitted buckets per set (`fitted_buckets`, least relative padding); starting
  from the one shape that holds everything, `(max_support, max_query)`
  rounded up, the candidate that most lowers the mean relative padding
  (padded rows / real rows of each episode, as `pick` pads it) is added
  until there are `num_pairs`. Deterministic: the same sizes give the same
  pairs in every process.

  Args:
    support_sizes: sampled support set sizes.
    query_sizes: the query set sizes of the same episodes.
    num_pairs: at most this many pairs (>= 1).
    max_support: the largest support size that must fit.
    max_query: the largest query size that must fit.
    multiple: every size is a multiple of this.
    num_candidates: fitted buckets per set that candidate pairs combine.

  Returns:
    `EpisodeBuckets` with `pairs`.
  """
  if num_pairs < 1:
    raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
  s_top, q_top = round_up(max_support, multiple), round_up(max_query,
                                                            multiple)
  s_cand = fitted_buckets(support_sizes, num_candidates, max_support,
                          multiple, relative=True)
  q_cand = fitted_buckets(query_sizes, num_candidates, max_query, multiple,
                          relative=True)
  points, counts = np.unique(
      np.stack([np.asarray(support_sizes, np.int64),
                np.asarray(query_sizes, np.int64)], 1), axis=0,
      return_counts=True)
  real = points.sum(1).astype(np.float64)
  cand = np.array([(s, q) for s in s_cand for q in q_cand], np.int64)
  # cost[c, p]: relative padded rows of point p in candidate c (inf: no fit).
  fits = ((cand[:, None, 0] >= points[None, :, 0]) &
          (cand[:, None, 1] >= points[None, :, 1]))
  cost = np.where(fits, cand.sum(1)[:, None] / real[None, :], np.inf)
  chosen = [int(np.flatnonzero((cand[:, 0] == s_top) &
                               (cand[:, 1] == q_top))[0])]
  current = cost[chosen[0]].copy()
  while len(chosen) < min(num_pairs, len(cand)):
    totals = (np.minimum(cost, current[None, :]) * counts).sum(1)
    totals[chosen] = np.inf
    best = int(np.argmin(totals))
    if not np.isfinite(totals[best]) or totals[best] >= (
        current * counts).sum():
      break
    chosen.append(best)
    current = np.minimum(current, cost[best])
  pairs = tuple(sorted((int(cand[c, 0]), int(cand[c, 1])) for c in chosen))
  return EpisodeBuckets(support=tuple(sorted({s for s, _ in pairs})),
                        query=tuple(sorted({q for _, q in pairs})),
                        pairs=pairs)


def pair_buckets_for_samplers(samplers: Sequence, num_pairs: int,
                              pad_multiple: int = 1) -> EpisodeBuckets:
  """`fitted_pairs` over `FIT_SAMPLES` episodes of the samplers.

  As `buckets_for_samplers` with `num_buckets`, but the allowed shapes are
  fitted jointly (`fitted_pairs`); a config whose sets have one fixed size
  each gets that one shape.
  """
  fixed = {(_fixed_support_size(s), _fixed_query_size(s)) for s in samplers}
  if len(fixed) == 1 and None not in next(iter(fixed)):
    s, q = fixed.pop()
    s, q = round_up(s, pad_multiple), round_up(q, pad_multiple)
    return EpisodeBuckets((s,), (q,), ((s, q),))
  support, query = sampled_set_sizes(samplers, FIT_SAMPLES)
  return fitted_pairs(support, query, num_pairs,
                      max(s.max_support_size() for s in samplers),
                      max(s.max_query_size() for s in samplers),
                      pad_multiple)


def sampled_set_sizes(samplers: Sequence, num_episodes: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Support and query sizes of `num_episodes` sampled descriptions.

  Copies of the samplers (same spec, split, config and hierarchy choice)
  with their own seeds are used, so the callers' episode streams are not
  advanced. Sources are picked uniformly, as the multi-source pipeline does.
  """
  rng = np.random.default_rng(seed)
  copies = [sampling.EpisodeDescriptionSampler(
      s.dataset_spec, s.split, s.config, seed=(seed, i),
      use_dag_hierarchy=s.use_dag_hierarchy,
      use_bilevel_hierarchy=s.use_bilevel_hierarchy)
            for i, s in enumerate(samplers)]
  sizes = np.zeros((num_episodes, 2), np.int64)
  for e in range(num_episodes):
    d = copies[rng.integers(len(copies))].sample_episode_description()
    sizes[e] = d.num_support.sum(), d.num_query.sum()
  return sizes[:, 0], sizes[:, 1]


# Episodes sampled to fit buckets: the fitted buckets' padding is within
# 0.1% of that of buckets fitted on 10x more (ILSVRC, 12 buckets).
FIT_SAMPLES = 20000


def buckets_for_samplers(samplers: Sequence, pad_multiple: int = 1,
                         growth: float = DEFAULT_GROWTH,
                         min_size: int = DEFAULT_MIN_SIZE,
                         num_buckets: int = 0) -> EpisodeBuckets:
  """Buckets covering every episode the given samplers can produce.

  Args:
    samplers: `EpisodeDescriptionSampler`s (one per source).
    pad_multiple: every padded size is a multiple of this.
    growth: geometric ratio between buckets (when `num_buckets` is 0).
    min_size: smallest bucket for variable sizes (when `num_buckets` is 0).
    num_buckets: if > 0, at most this many buckets per set, fitted to the
      samplers' distribution of set sizes (`fitted_buckets` on
      `FIT_SAMPLES` sampled descriptions, least mean relative padding, so
      that small episodes are not padded to many times their size); 0
      means geometric buckets.

  Returns:
    `EpisodeBuckets`; a single bucket per set when all samplers produce one
    fixed size.
  """
  sampled = []  # Sizes sampled once, only if some set is variable.

  def make(index, max_fn, fixed_fn):
    fixed = {fixed_fn(s) for s in samplers}
    if len(fixed) == 1 and None not in fixed:
      return (round_up(fixed.pop(), pad_multiple),)
    top = max(max_fn(s) for s in samplers)
    if num_buckets:
      if not sampled:
        sampled.extend(sampled_set_sizes(samplers, FIT_SAMPLES))
      return fitted_buckets(sampled[index], num_buckets, top, pad_multiple,
                            relative=True)
    return geometric_buckets(top, min_size, growth, pad_multiple)
  return EpisodeBuckets(
      support=make(0, lambda s: s.max_support_size(), _fixed_support_size),
      query=make(1, lambda s: s.max_query_size(), _fixed_query_size))


def _fixed_support_size(sampler):
  cfg = sampler.config
  if sampler.num_ways is None or not isinstance(cfg.num_support, int):
    return None
  return sampler.num_ways * cfg.num_support


def _fixed_query_size(sampler):
  if sampler.num_ways is None or sampler.config.num_query is None:
    return None
  return sampler.num_ways * sampler.config.num_query


def padding_waste(samplers: Sequence, buckets: EpisodeBuckets,
                  num_episodes: int, seed: int = 0) -> dict[str, float]:
  """Fraction of padded rows over sampled episodes (sources uniform).

  Args:
    samplers: samplers of the sources (their RNG state advances).
    buckets: the buckets to pad to.
    num_episodes: how many descriptions to sample.
    seed: seed of the source choice.

  Returns:
    Dict with `support`, `query` and `total` padded-row fractions.
  """
  rng = np.random.default_rng(seed)
  real = np.zeros(2)
  padded = np.zeros(2)
  shapes = set()
  for _ in range(num_episodes):
    d = samplers[rng.integers(len(samplers))].sample_episode_description()
    sizes = np.array([d.num_support.sum(), d.num_query.sum()])
    real += sizes
    shape = buckets.pick(*sizes)
    shapes.add(shape)
    padded += shape
  waste = 1.0 - real / padded
  return {"support": float(waste[0]), "query": float(waste[1]),
          "total": float(1.0 - real.sum() / padded.sum()),
          "shapes_seen": len(shapes)}


def _report():
  """Prints the waste table of the module docstring."""
  specs_dir = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                           "fixtures", "official_specs", "dataset_specs")
  cfg = sampling.EpisodeDescriptionConfig()
  md_train = ["ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd",
              "quickdraw", "fungi", "vgg_flower"]
  cases = {"ilsvrc_2012 train": ["ilsvrc_2012"],
           "omniglot train": ["omniglot"],
           "8 MD train sources": md_train}
  for name, sources in cases.items():
    for growth in (2.0, 1.5, 1.25):
      for multiple in (1, 8):
        samplers = [sampling.EpisodeDescriptionSampler(
            dataset_spec.load_dataset_spec(
                os.path.join(specs_dir, f"{s}_dataset_spec.json")),
            "TRAIN", cfg, seed=i) for i, s in enumerate(sources)]
        buckets = buckets_for_samplers(samplers, multiple, growth)
        waste = padding_waste(samplers, buckets, 20000)
        print(f"{name:20s} growth={growth:<5} multiple={multiple} programs="
              f"{buckets.num_programs:4d} seen={waste['shapes_seen']:4d} "
              f"waste total={waste['total']:.3f} "
              f"support={waste['support']:.3f} query={waste['query']:.3f} "
              f"S={buckets.support} Q={buckets.query}")


if __name__ == "__main__":
  _report()


def row_block(num_padded: int, block: int, num_blocks: int) -> range:
  """Padded rows `[b*P/n, (b+1)*P/n)` of a set: block `b` of `n`.

  How a padded support or query set is cut into contiguous blocks, one per
  process (the pipeline's `row_block`) or per device (`shard_map`'s split of
  the leading axis): the one definition both follow.

  Raises:
    ValueError: `num_padded` does not split into `num_blocks` blocks.
  """
  if num_padded % num_blocks:
    raise ValueError(f"{num_padded} padded rows do not split into "
                     f"{num_blocks} row blocks; use a pad_multiple divisible "
                     f"by {num_blocks}")
  size = num_padded // num_blocks
  return range(block * size, (block + 1) * size)
