"""Episode description sampler: exact checks and statistical tests.

The statistical tests compare the sampler's output with distributions
derived here from the official algorithm and the raw spec JSON (not from the
code under test): the exact distribution of ways for flat, bi-level and DAG
sampling, each class's exact inclusion probability, the exact distribution
of queries per class, and conditional probability-integral transforms (PIT)
of the support-set size and of a class's number of shots. Seeds are fixed,
so the tests are deterministic; thresholds are 1e-3 (Bonferroni-corrected
where many classes are tested at once).
"""

import json
import math

import numpy as np
import pytest
from scipy import special
from scipy import stats

from meta_dataset_pipeline import sampling
import meta_dataset_pipeline as mdp

ALPHA = 1e-3
CFG = mdp.EpisodeDescriptionConfig()  # Official variable way and shot.


def _raw(shared_dir, name):
  path = (shared_dir / "fixtures" / "official_specs" / "dataset_specs" /
          f"{name}_dataset_spec.json")
  return json.loads(path.read_text()), mdp.load_dataset_spec(path)


def _sample(spec, split, num, seed=0, cfg=CFG, **kwargs):
  sampler = mdp.EpisodeDescriptionSampler(spec, split, cfg, seed=seed,
                                          **kwargs)
  return [sampler.sample_episode_description() for _ in range(num)]


def _chisquare(observed, expected, min_expected=5.0):
  """Chi-square p-value after merging low-expectation bins into one."""
  observed, expected = np.asarray(observed, float), np.asarray(expected, float)
  small = expected < min_expected
  obs = np.append(observed[~small], observed[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  obs, exp = obs[keep], exp[keep]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _ways_pvalue(descs, ways_probs):
  ways = np.array([len(d.class_ids) for d in descs])
  assert set(ways) <= set(ways_probs)
  values = sorted(ways_probs)
  observed = [(ways == w).sum() for w in values]
  expected = [ways_probs[w] * len(descs) for w in values]
  return _chisquare(observed, expected)


def _inclusion_pvalue(descs, num_classes, inclusion):
  """Min over classes of a two-sided binomial p-value, Bonferroni'd.

  Each class's count of episodes including it is exactly
  Binomial(episodes, p_c), whatever the dependence between classes.
  """
  counts = np.bincount(np.concatenate([d.class_ids for d in descs]),
                       minlength=num_classes)
  n = len(descs)
  lower = stats.binom.cdf(counts, n, inclusion)
  upper = stats.binom.sf(counts - 1, n, inclusion)
  pvals = np.minimum(1.0, 2 * np.minimum(lower, upper))
  return min(1.0, pvals.min() * num_classes)


def _uniform_ways(num_classes, cfg=CFG):
  top = min(cfg.max_ways_upper_bound, num_classes)
  return {w: 1.0 / (top - cfg.min_ways + 1)
          for w in range(cfg.min_ways, top + 1)}


# --- Derivations from the raw JSON (independent of the code under test).


def _dag_spans(raw, split, offset):
  """Relative leaf ids spanned by each eligible internal node."""
  nodes = {n["wn_id"]: n["children_ids"] for n in raw["split_subgraphs"][split]}
  ids = {v: int(k) - offset for k, v in raw["class_names"].items()}
  memo = {}

  def leaves(wn_id):
    if wn_id not in memo:
      kids = nodes[wn_id]
      memo[wn_id] = (frozenset([wn_id]) if not kids
                     else frozenset().union(*map(leaves, kids)))
    return memo[wn_id]

  spans = []
  for wn_id, kids in nodes.items():
    if kids and 5 <= len(leaves(wn_id)) <= 392:
      spans.append([ids[l] for l in leaves(wn_id)])
  return spans


def _dag_expectations(raw, split, offset, num_classes):
  spans = _dag_spans(raw, split, offset)
  ways = {}
  inclusion = np.zeros(num_classes)
  for span in spans:
    w = min(len(span), 50)
    ways[w] = ways.get(w, 0) + 1 / len(spans)
    inclusion[span] += w / len(span) / len(spans)
  return ways, inclusion


def _bilevel_expectations(raw, split):
  per_split = raw["superclasses_per_split"]
  start = {"TRAIN": 0, "VALID": per_split["TRAIN"],
           "TEST": per_split["TRAIN"] + per_split["VALID"]}[split]
  sizes = [int(raw["classes_per_superclass"][str(i)])
           for i in range(len(raw["classes_per_superclass"]))]
  ways, inclusion = {}, []
  for sc in range(start, start + per_split[split]):
    top = min(50, sizes[sc])
    for w in range(5, top + 1):
      ways[w] = ways.get(w, 0) + 1 / per_split[split] / (top - 4)
    inclusion += [(5 + top) / 2 / sizes[sc] / per_split[split]] * sizes[sc]
  return ways, np.array(inclusion)


# --- Ways and class frequencies.


@pytest.mark.parametrize("name, split", [("ilsvrc_2012", "TRAIN"),
                                         ("ilsvrc_2012", "TEST")])
def test_dag_ways_and_class_frequencies(shared_dir, name, split):
  raw, spec = _raw(shared_dir, name)
  classes = spec.get_classes(split)
  ways, inclusion = _dag_expectations(raw, split, classes.start, len(classes))
  descs = _sample(spec, split, 3000, seed=1)
  assert _ways_pvalue(descs, ways) > ALPHA
  assert _inclusion_pvalue(descs, len(classes), inclusion) > ALPHA
  # Episode classes are the (sub-sampled) leaves of one node.
  spans = [set(s) for s in _dag_spans(raw, split, classes.start)]
  for d in descs[:200]:
    assert any(set(d.class_ids.tolist()) <= s for s in spans)


def test_bilevel_ways_and_class_frequencies(shared_dir):
  raw, spec = _raw(shared_dir, "omniglot")
  ways, inclusion = _bilevel_expectations(raw, "TEST")
  descs = _sample(spec, "TEST", 3000, seed=2)
  assert _ways_pvalue(descs, ways) > ALPHA
  assert _inclusion_pvalue(descs, len(inclusion), inclusion) > ALPHA
  # All classes of an episode come from one alphabet.
  offsets = np.cumsum([0] + [spec.classes_per_superclass[i]
                             for i in spec.get_superclasses("TEST")])
  for d in descs[:200]:
    alphabet = np.searchsorted(offsets, d.class_ids, side="right")
    assert len(set(alphabet)) == 1


def test_flat_ways_and_class_frequencies(shared_dir):
  _, spec = _raw(shared_dir, "aircraft")
  descs = _sample(spec, "TRAIN", 3000, seed=3)
  ways = _uniform_ways(70)
  assert _ways_pvalue(descs, ways) > ALPHA
  mean_ways = sum(w * p for w, p in ways.items())
  assert _inclusion_pvalue(descs, 70, np.full(70, mean_ways / 70)) > ALPHA


def test_ignore_hierarchy_probability_mixes(shared_dir):
  raw, spec = _raw(shared_dir, "ilsvrc_2012")
  cfg = mdp.EpisodeDescriptionConfig(ignore_hierarchy_probability=0.5)
  dag_ways, _ = _dag_expectations(raw, "TEST", 870, 130)
  flat = _uniform_ways(130)
  mix = {w: 0.5 * dag_ways.get(w, 0) + 0.5 * flat.get(w, 0)
         for w in set(dag_ways) | set(flat)}
  assert _ways_pvalue(_sample(spec, "TEST", 2000, seed=4, cfg=cfg),
                      mix) > ALPHA


# --- Queries.


def test_query_count_distribution(shared_dir):
  """fungi has classes of 6..442 images, so queries per class vary."""
  raw, spec = _raw(shared_dir, "fungi")
  counts = np.array([int(raw["images_per_class"][str(c)])
                     for c in range(994)])
  halves = np.minimum(counts // 2, 10)
  probs = np.zeros(11)
  for w, pw in _uniform_ways(994).items():
    # P(min over w distinct classes of half-size >= t), hypergeometric.
    at_least = [math.exp(special.gammaln((halves >= t).sum() + 1)
                         - special.gammaln((halves >= t).sum() - w + 1)
                         - special.gammaln(995) + special.gammaln(995 - w))
                if (halves >= t).sum() >= w else 0.0 for t in range(12)]
    probs += pw * (np.array(at_least[:11]) - np.array(at_least[1:12]))
  descs = _sample(spec, "TRAIN", 3000, seed=5)
  queries = np.array([d.num_query[0] for d in descs])
  assert all((d.num_query == d.num_query[0]).all() for d in descs)
  observed = np.bincount(queries, minlength=11)
  assert _chisquare(observed, probs * len(descs)) > ALPHA


# --- Support sizes and shots, by conditional PIT.


def _pit_support_set_size(descs, images):
  """Randomized PIT of s given the episode's classes (exact law of beta)."""
  rng = np.random.default_rng(0)
  u = []
  for d in descs:
    n = images[d.class_ids]
    contrib = np.minimum(100, n - d.num_query)
    ways = len(n)
    values, mult = np.unique(contrib, return_counts=True)
    # S(beta) = min(sum floor(beta c) + ways, 500) jumps at beta = k / c.
    num = np.concatenate([np.arange(c) for c in values])
    den = np.concatenate([np.full(c, c) for c in values])
    order = np.argsort(num / den, kind="stable")
    num, den = num[order], den[order]
    floors = (num[:, None] * values[None, :]) // den[:, None]
    size = np.minimum((floors * mult).sum(axis=1) + ways, 500)
    beta = np.append(num / den, 1.0)
    s = d.support_set_size
    lo = beta[np.argmax(np.append(size >= s, True))]
    hi = beta[np.argmax(np.append(size > s, True))]
    assert hi > lo, "impossible support-set size"
    u.append(lo + rng.uniform() * (hi - lo))
  return stats.kstest(u, "uniform").pvalue


def _sum_density(scales, lo, hi, cells):
  """Masses of sum_j scales_j * exp(U_j) on a grid (U_j ~ U(lo, hi))."""
  h = np.exp(hi) * np.sum(scales) / cells
  edges = np.arange(cells + 1) * h
  spectrum = np.ones(cells + 1, dtype=complex)
  values, counts = np.unique(scales, return_counts=True)
  for a, m in zip(values, counts):
    cdf = np.clip((np.log(np.maximum(edges / a, 1e-300)) - lo) / (hi - lo),
                  0, 1)
    # The sum never exceeds cells * h, so a 2 * cells circular convolution
    # equals the linear one.
    spectrum *= np.fft.rfft(np.diff(cdf), 2 * cells) ** m
  mass = np.clip(np.fft.irfft(spectrum, 2 * cells), 0, None)
  # Cell i stands for [i h, (i + 1) h): a sum of len(scales) cells is
  # centred half a cell per term higher.
  return (np.arange(2 * cells) + len(scales) / 2) * h, mass


def _pit_shots(descs, images, cfg=CFG, cells=4096):
  """Randomized PIT of the first class's shots given (s, classes)."""
  rng = np.random.default_rng(0)
  lo, hi = cfg.min_log_weight, cfg.max_log_weight
  u = []
  for d in descs:
    n = images[d.class_ids].astype(float)
    ways = len(n)
    remaining_size = d.support_set_size - ways
    r = n[0] - d.num_query[0]
    k = d.num_support[0]
    if remaining_size == 0:
      assert k == 1
      u.append(rng.uniform())
      continue
    t_values, t_mass = _sum_density(n[1:], lo, hi, cells)

    def cdf(t):  # P(p_1 < t), p_1 = a X / (a X + T).
      if t <= 0:
        return 0.0
      if t >= 1:
        return 1.0
      x = np.clip(t / (1 - t) * t_values / n[0], 1e-300, None)
      return float(np.sum(t_mass * np.clip((np.log(x) - lo) / (hi - lo),
                                           0, 1)))

    low = cdf((k - 1) / remaining_size)
    high = 1.0 if k == r else cdf(k / remaining_size)
    u.append(low + rng.uniform() * (high - low))
  return stats.kstest(u, "uniform").pvalue


@pytest.mark.parametrize("name, split, num", [
    ("ilsvrc_2012", "TRAIN", 1500), ("ilsvrc_2012", "TEST", 1500),
    ("omniglot", "TEST", 1500), ("fungi", "TRAIN", 1500),
    ("aircraft", "TRAIN", 1500)])
def test_support_sizes_and_shots(shared_dir, name, split, num):
  _, spec = _raw(shared_dir, name)
  classes = spec.get_classes(split)
  images = np.array([spec.get_total_images_per_class(c) for c in classes])
  descs = _sample(spec, split, num, seed=6)
  for d in descs:
    remaining = images[d.class_ids] - d.num_query
    assert (d.num_support >= 1).all() and (d.num_support <= remaining).all()
    assert d.num_support.sum() <= d.support_set_size <= 500
    assert d.num_query[0] <= 10
    assert len(set(d.class_ids.tolist())) == len(d.class_ids)
  assert _pit_support_set_size(descs, images) > ALPHA
  assert _pit_shots(descs[:600], images) > ALPHA


# --- Exact behaviour of fixed shapes, seeding and bounds.


def test_fixed_way_and_shot(shared_dir):
  _, spec = _raw(shared_dir, "omniglot")
  cfg = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=1,
                                     num_query=15)
  descs = _sample(spec, "TRAIN", 200, seed=7, cfg=cfg)
  for d in descs:
    assert len(d.class_ids) == 5
    assert (d.num_support == 1).all() and (d.num_query == 15).all()
    assert d.class_ids.max() < 883
  # Fixed ways on a bi-level source samples classes uniformly (see the
  # module docstring), so classes mix alphabets.
  assert mdp.max_ways(cfg, spec, "TRAIN") == 5


def test_support_range_and_fixed_query_variable_way(shared_dir):
  _, spec = _raw(shared_dir, "cu_birds")
  cfg = mdp.EpisodeDescriptionConfig(num_support=(2, 6), num_query=5)
  descs = _sample(spec, "TRAIN", 1400, seed=8, cfg=cfg)
  shots = np.array([d.num_support[0] for d in descs])
  assert all((d.num_support == d.num_support[0]).all() for d in descs)
  assert _chisquare(np.bincount(shots, minlength=7)[2:],
                    np.full(5, len(descs) / 5)) > ALPHA
  assert all((d.num_query == 5).all() for d in descs)


def test_query_rule_with_fixed_support(shared_dir):
  _, spec = _raw(shared_dir, "fungi")
  cfg = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=4,
                                     min_examples_in_class=8)
  sampler = mdp.EpisodeDescriptionSampler(spec, "TRAIN", cfg, seed=9)
  images = np.array([spec.get_total_images_per_class(c)
                     for c in spec.get_classes("TRAIN")])
  for _ in range(200):
    d = sampler.sample_episode_description()
    smallest = images[d.class_ids].min()
    assert smallest >= 8
    assert d.num_query[0] == min(10, smallest - 4)


def test_seeded_and_reproducible(shared_dir):
  _, spec = _raw(shared_dir, "ilsvrc_2012")
  a = _sample(spec, "TRAIN", 20, seed=11)
  b = _sample(spec, "TRAIN", 20, seed=11)
  c = _sample(spec, "TRAIN", 20, seed=12)
  same = lambda x, y: all(np.array_equal(p, q) for p, q in zip(x, y))
  assert all(same(x, y) for x, y in zip(a, b))
  assert not all(same(x, y) for x, y in zip(a, c))


def test_static_bounds_hold(shared_dir):
  for name, split in [("ilsvrc_2012", "TRAIN"), ("omniglot", "TEST"),
                      ("fungi", "VALID")]:
    _, spec = _raw(shared_dir, name)
    sampler = mdp.EpisodeDescriptionSampler(spec, split, CFG, seed=0)
    for _ in range(300):
      d = sampler.sample_episode_description()
      assert len(d.class_ids) <= sampler.max_ways()
      assert d.num_support.sum() <= sampler.max_support_size()
      assert d.num_query.sum() <= sampler.max_query_size()
  _, omni = _raw(shared_dir, "omniglot")
  _, ilsvrc = _raw(shared_dir, "ilsvrc_2012")
  assert mdp.max_ways(CFG) == 50
  assert mdp.max_ways(CFG, [omni, ilsvrc], "TRAIN") == 50


def test_use_all_classes(shared_dir):
  _, spec = _raw(shared_dir, "dtd")
  sampler = mdp.EpisodeDescriptionSampler(spec, "TEST", CFG,
                                          use_all_classes=True)
  d = sampler.sample_episode_description()
  assert d.class_ids.tolist() == list(range(7))


# --- Impossible configurations.


def test_impossible_configs_name_the_key(shared_dir):
  _, traffic = _raw(shared_dir, "traffic_sign")
  cfg = mdp.EpisodeDescriptionConfig(min_ways=45, max_ways_upper_bound=60)
  with pytest.raises(ValueError, match=r"min_ways=45.*TEST.*43"):
    mdp.EpisodeDescriptionSampler(traffic, "TEST", cfg)
  with pytest.raises(ValueError, match="num_ways=50 .*43"):
    mdp.EpisodeDescriptionSampler(
        traffic, "TEST", mdp.EpisodeDescriptionConfig(num_ways=50))

  _, fungi = _raw(shared_dir, "fungi")
  cfg = mdp.EpisodeDescriptionConfig(num_ways=5, num_support=5, num_query=5)
  with pytest.raises(ValueError, match=r"num_support \+ num_query = 10.*"
                     r"have fewer: \d+ \(.*\) has \d"):
    mdp.EpisodeDescriptionSampler(fungi, "TRAIN", cfg)
  # Dropping small classes makes the same config valid.
  mdp.EpisodeDescriptionSampler(fungi, "TRAIN", mdp.EpisodeDescriptionConfig(
      num_ways=5, num_support=5, num_query=5, min_examples_in_class=10))

  _, omniglot = _raw(shared_dir, "omniglot")
  with pytest.raises(ValueError, match=r"min_ways=30 but superclass \d+"):
    mdp.EpisodeDescriptionSampler(
        omniglot, "TEST", mdp.EpisodeDescriptionConfig(min_ways=30))
  _, ilsvrc = _raw(shared_dir, "ilsvrc_2012")
  with pytest.raises(ValueError, match="no node of the DAG"):
    # Train's root spans 712 > 392 leaves, so no node is eligible.
    mdp.EpisodeDescriptionSampler(ilsvrc, "TRAIN",
                                  mdp.EpisodeDescriptionConfig(
                                      min_ways=400, max_ways_upper_bound=500))
  with pytest.raises(ValueError, match="incompatible with"):
    mdp.EpisodeDescriptionSampler(
        ilsvrc, "TEST", mdp.EpisodeDescriptionConfig(num_ways=5),
        use_dag_hierarchy=True)


@pytest.mark.parametrize("kwargs, key", [
    (dict(min_ways=10, max_ways_upper_bound=5), "max_ways_upper_bound"),
    (dict(num_support=(3, 2)), "num_support"),
    (dict(num_query=0), "num_query"),
    (dict(ignore_hierarchy_probability=2.0), "ignore_hierarchy_probability"),
    (dict(simclr_episode_fraction=1.5), "simclr_episode_fraction"),
])
def test_config_validation(kwargs, key):
  with pytest.raises(ValueError, match=f"EpisodeDescriptionConfig.{key}"):
    mdp.EpisodeDescriptionConfig(**kwargs)


def test_helpers_match_upstream_formulas():
  rng = np.random.default_rng(0)
  images = np.array([20, 30, 40])
  assert sampling.compute_num_query(images, 10, None) == 10
  assert sampling.compute_num_query(images, 10, 15) == 5
  assert sampling.compute_num_query(images, 10, (1, 18)) == 2
  sizes = [sampling.sample_support_set_size(np.array([5, 4]), 100, 500, rng)
           for _ in range(500)]
  assert set(sizes) == set(range(2, 10))
  assert sampling.sample_support_set_size(np.array([90] * 10), 100, 50,
                                          rng) <= 50
