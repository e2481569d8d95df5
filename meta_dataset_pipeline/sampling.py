"""Episode descriptions: which classes, and how many support/query examples.

This mirrors the official `EpisodeDescriptionSampler`
(`meta_dataset/data/sampling.py`): same configuration names and defaults
(`data_config_common.gin`), same distributions. By default each sampler
draws from its own seeded `numpy.random.Generator`: reproducible, but not
the official draws. `EpisodeDescriptionConfig.rng="official"` uses the
official scheme instead (a legacy `RandomState` per sampler, seeded from a
module-level one, `official_rngs`), and then a seed gives exactly the
official sampler's episode descriptions (tests/official_sampler_test.py
compares with descriptions written by the official code).

For one episode of a split with classes C (after dropping classes with fewer
than `min_examples_in_class` images):

1. Classes.
   - Fixed `num_ways`: that many classes, uniformly without replacement.
   - Variable way, flat source: ways ~ Uniform{min_ways .. min(
     max_ways_upper_bound, |C|)}, then classes uniformly without replacement.
   - Bi-level source (Omniglot): a superclass uniformly among the split's,
     ways ~ Uniform{min_ways .. min(max_ways_upper_bound, its size)}, then
     classes of that superclass uniformly without replacement.
   - DAG source (ILSVRC): an internal node of the split's DAG uniformly among
     the *eligible* ones (spanning between `min_ways` and 392 usable leaves),
     its spanned leaves sorted by WordNet id, subsampled without replacement
     to `max_ways_upper_bound` when there are more.
   With `ignore_hierarchy_probability` p, a hierarchical source uses the flat
   rule for a fraction p of episodes.
2. Queries per class (balanced): `num_query` if fixed, else
   min(max_num_query, min_c floor(n_c / 2)) for variable shots, or
   min(max_num_query, min_c n_c - max_support) for fixed shots.
3. Supports per class.
   - Fixed `num_support` k (or a range (lo, hi), one uniform draw per
     episode): k for every class.
   - Variable: a support-set size
     s = min(max_support_set_size, sum_c ceil(beta * min(
     max_support_size_contrib_per_class, n_c - q))) with beta ~ U(0, 1], then
     per class k_c = min(n_c - q, 1 + floor(w_c / sum(w) * (s - ways))) with
     w_c = n_c * exp(U(min_log_weight, max_log_weight)): class-imbalanced,
     roughly proportional to class size.

Class ids in a description are relative to the split, as upstream reports
them. Differences from upstream, all deliberate:

- Impossible configurations fail when the sampler is built, naming the key
  and the offending classes, instead of on the first unlucky episode.
- Whether the ontology is used defaults to the spec type (as the official
  trainer decides by dataset name), but only for variable-way configs: a
  fixed `num_ways` on Omniglot or ILSVRC samples classes uniformly, where
  upstream raises. Passing `use_*_hierarchy=True` explicitly keeps the
  upstream error.
- `simclr_episode_fraction` does not affect sampling: the episode pipeline
  converts that fraction of the sampled episodes (see `simclr.py`).
"""

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np

from meta_dataset_pipeline import dataset_spec as spec_lib

# Upstream's bound on the leaves an ILSVRC node may span to be eligible: the
# smallest value that keeps every leaf reachable.
MAX_SPANNING_LEAVES_ELIGIBLE = 392


@dataclasses.dataclass(frozen=True)
class EpisodeDescriptionConfig:
  """Episode shape parameters; official names, `data_config_common` defaults.

  `num_ways`, `num_support` and `num_query` set to None mean variable way and
  shot. `num_support` may also be a `(low, high)` range, sampled once per
  episode. See the module docstring for how each field is used.
  """
  num_ways: int | None = None
  num_support: int | tuple[int, int] | None = None
  num_query: int | None = None
  min_ways: int = 5
  max_ways_upper_bound: int = 50
  max_num_query: int = 10
  max_support_set_size: int = 500
  max_support_size_contrib_per_class: int = 100
  min_log_weight: float = math.log(0.5)
  max_log_weight: float = math.log(2)
  ignore_dag_ontology: bool = False
  ignore_bilevel_ontology: bool = False
  ignore_hierarchy_probability: float = 0.0
  simclr_episode_fraction: float = 0.0
  min_examples_in_class: int = 0
  num_unique_descriptions: int = 0
  episode_description_switch_frequency: int = 1
  # "generator": a seeded numpy Generator per sampler (default).
  # "official": the official legacy RandomState scheme (`official_rngs`), so
  # a seed gives exactly the official sampler's episode descriptions.
  rng: str = "generator"

  def __post_init__(self):
    if isinstance(self.num_support, list):
      object.__setattr__(self, "num_support", tuple(self.num_support))
    checks = [
        (self.num_ways is None or self.num_ways >= 1, "num_ways", ">= 1"),
        (self.num_query is None or self.num_query >= 1, "num_query", ">= 1"),
        (self.min_ways >= 1, "min_ways", ">= 1"),
        (self.max_ways_upper_bound >= self.min_ways, "max_ways_upper_bound",
         ">= min_ways"),
        (self.max_num_query >= 1, "max_num_query", ">= 1"),
        (self.max_support_size_contrib_per_class >= 1,
         "max_support_size_contrib_per_class", ">= 1"),
        (self.min_log_weight <= self.max_log_weight, "min_log_weight",
         "<= max_log_weight"),
        (0.0 <= self.ignore_hierarchy_probability <= 1.0,
         "ignore_hierarchy_probability", "in [0, 1]"),
        (self.episode_description_switch_frequency >= 1,
         "episode_description_switch_frequency", ">= 1"),
        (self.num_unique_descriptions >= 0, "num_unique_descriptions",
         ">= 0"),
        (0.0 <= self.simclr_episode_fraction <= 1.0,
         "simclr_episode_fraction", "in [0, 1]"),
        (self.rng in RNG_MODES, "rng", f"one of {RNG_MODES}"),
    ]
    ns = self.num_support
    if isinstance(ns, tuple):
      checks.append((len(ns) == 2 and 1 <= ns[0] <= ns[1], "num_support",
                     "a (low, high) pair with 1 <= low <= high"))
    elif ns is not None:
      checks.append((ns >= 1, "num_support", ">= 1"))
    for ok, key, what in checks:
      if not ok:
        raise ValueError(f"EpisodeDescriptionConfig.{key} must be {what} "
                         f"(got {getattr(self, key)!r})")

  @property
  def max_ways(self) -> int:
    """Ways of the episode, or its upper bound when variable (upstream)."""
    return self.num_ways or self.max_ways_upper_bound

  @property
  def max_num_support(self) -> int | None:
    """Largest fixed per-class support count, None when variable."""
    ns = self.num_support
    return ns[1] if isinstance(ns, tuple) else ns


class EpisodeDescription(NamedTuple):
  """One episode: per-class arrays aligned on `class_ids` (split-relative).

  `support_set_size` is the sampled support-set size s of variable-shot
  episodes (the per-class counts sum to at most s, flooring loses the rest);
  for fixed shots it is the support set's size.
  """
  class_ids: np.ndarray
  num_support: np.ndarray
  num_query: np.ndarray
  support_set_size: int = 0

  @property
  def num_ways(self) -> int:
    return len(self.class_ids)


def sample_num_ways_uniformly(num_classes: int, min_ways: int, max_ways: int,
                              rng: np.random.Generator) -> int:
  """Ways ~ Uniform{min_ways .. min(max_ways, num_classes)}."""
  return int(rng.integers(min_ways, min(max_ways, num_classes) + 1))


def compute_num_query(images_per_class: np.ndarray, max_num_query: int,
                      num_support) -> int:
  """Balanced queries per class (upstream rule, see module docstring)."""
  if num_support is None:
    return int(min(max_num_query, (images_per_class // 2).min()))
  max_support = num_support[1] if isinstance(num_support, tuple) else (
      num_support)
  return int(min(max_num_query, images_per_class.min() - max_support))


def sample_support_set_size(num_remaining_per_class: np.ndarray,
                            max_support_size_contrib_per_class: int,
                            max_support_set_size: int,
                            rng: np.random.Generator) -> int:
  """Support-set size: at least one example per class, capped."""
  beta = rng.uniform()
  contributions = np.minimum(max_support_size_contrib_per_class,
                             num_remaining_per_class)
  # floor(beta * c) + 1 with beta in [0, 1) equals ceil(beta' * c) with
  # beta' in (0, 1]: every class contributes at least one example.
  return int(min(np.floor(beta * contributions + 1).sum(),
                 max_support_set_size))


def sample_num_support_per_class(images_per_class: np.ndarray,
                                 num_remaining_per_class: np.ndarray,
                                 support_set_size: int, min_log_weight: float,
                                 max_log_weight: float,
                                 rng: np.random.Generator) -> np.ndarray:
  """Class-imbalanced support counts, roughly proportional to class size."""
  remaining_size = support_set_size - len(num_remaining_per_class)
  weights = images_per_class * np.exp(
      rng.uniform(min_log_weight, max_log_weight, size=images_per_class.shape))
  proportions = weights / weights.sum()
  desired = np.floor(proportions * remaining_size).astype(np.int64) + 1
  return np.minimum(desired, num_remaining_per_class)


def _class_label(spec, abs_id: int) -> str:
  return f"{abs_id} ({spec.class_names.get(abs_id, '?')})"


RNG_MODES = ("generator", "official")


def official_rngs(seed: int, count: int) -> list[np.random.RandomState]:
  """The RandomStates of `count` official samplers built after seeding.

  Upstream keeps a module-level `RandomState`; each sampler, when built,
  seeds its own `RandomState` with one uint32 drawn from it. Seeding the
  module state with `seed` and building `count` samplers (one per source, in
  source order) gives these.
  """
  module_rng = np.random.RandomState(seed)
  return [np.random.RandomState(module_rng.randint(0, 2**32, dtype="uint32"))
          for _ in range(count)]


class _LegacyGenerator:
  """A `RandomState` behind the `Generator` methods this module calls.

  `integers(lo, hi)` is upstream's `randint(lo, hi)`; `choice` and
  `uniform` are the same calls on both. `legacy` is the RandomState, for the
  few draws whose upstream form differs.
  """

  def __init__(self, legacy: np.random.RandomState):
    self.legacy = legacy

  def integers(self, low, high=None, size=None):
    return self.legacy.randint(low, high, size=size)

  def choice(self, *args, **kwargs):
    return self.legacy.choice(*args, **kwargs)

  def uniform(self, *args, **kwargs):
    return self.legacy.uniform(*args, **kwargs)


class EpisodeDescriptionSampler:
  """Samples episode descriptions for one split of one source."""

  def __init__(self, dataset_spec, split, episode_config:
               EpisodeDescriptionConfig, seed=0, use_dag_hierarchy=None,
               use_bilevel_hierarchy=None, use_all_classes: bool = False):
    """Builds a sampler and checks that the config can produce episodes.

    Args:
      dataset_spec: a spec from `load_dataset_spec`.
      split: a `Split` (or its name).
      episode_config: an `EpisodeDescriptionConfig`.
      seed: an int, a sequence of ints, a `numpy.random.Generator`, or a
        legacy `numpy.random.RandomState` (the official scheme, see
        `official_rngs`: draws then follow the official sampler call for
        call).
      use_dag_hierarchy: sample ILSVRC classes through the DAG; None means
        "if the spec has a DAG, ways are variable, and the config does not
        set `ignore_dag_ontology`".
      use_bilevel_hierarchy: the same for Omniglot's superclasses.
      use_all_classes: every episode uses all classes of the split, in order
        (upstream option).

    Raises:
      ValueError: the config cannot produce episodes for this split (the
        message names the config key and, where relevant, the classes).
    """
    cfg = episode_config
    self.dataset_spec = dataset_spec
    self.split = spec_lib.as_split(split)
    self.config = cfg
    self._legacy = isinstance(seed, np.random.RandomState)
    if self._legacy:
      self._rng = _LegacyGenerator(seed)
    elif isinstance(seed, np.random.Generator):
      self._rng = seed
    else:
      self._rng = np.random.default_rng(seed)
    self.class_set = dataset_spec.get_classes(self.split)
    self.num_classes = len(self.class_set)
    where = f"split {self.split.name} of '{dataset_spec.name}'"

    counts = np.array([dataset_spec.get_total_images_per_class(c)
                       for c in self.class_set], dtype=np.int64)
    self._images_per_rel_class = counts
    keep = counts >= cfg.min_examples_in_class
    self._filtered_rel = np.flatnonzero(keep)
    num_filtered = len(self._filtered_rel)

    self.num_ways = cfg.num_ways
    if use_all_classes:
      if num_filtered != self.num_classes:
        raise ValueError("use_all_classes is incompatible with "
                         "EpisodeDescriptionConfig.min_examples_in_class="
                         f"{cfg.min_examples_in_class}, which drops classes")
      self.num_ways = self.num_classes
    self.use_all_classes = use_all_classes
    if self.num_ways is not None and self.num_ways > num_filtered:
      raise ValueError(
          f"EpisodeDescriptionConfig.num_ways={self.num_ways} but {where} "
          f"has only {num_filtered} usable classes")
    if self.num_ways is None and num_filtered < cfg.min_ways:
      raise ValueError(
          f"EpisodeDescriptionConfig.min_ways={cfg.min_ways} but {where} has "
          f"only {num_filtered} classes with at least min_examples_in_class="
          f"{cfg.min_examples_in_class} images ({self.num_classes} in total)")
    self._check_class_sizes(counts[keep], self._filtered_rel, where)

    variable_way = self.num_ways is None
    if use_dag_hierarchy is None:
      use_dag_hierarchy = (spec_lib.has_dag_ontology(dataset_spec)
                           and variable_way and not cfg.ignore_dag_ontology)
    elif cfg.ignore_dag_ontology:
      use_dag_hierarchy = False
    if use_bilevel_hierarchy is None:
      use_bilevel_hierarchy = (spec_lib.has_bilevel_ontology(dataset_spec)
                               and variable_way
                               and not cfg.ignore_bilevel_ontology)
    elif cfg.ignore_bilevel_ontology:
      use_bilevel_hierarchy = False
    self.use_dag_hierarchy = use_dag_hierarchy
    self.use_bilevel_hierarchy = use_bilevel_hierarchy
    if use_dag_hierarchy and use_bilevel_hierarchy:
      raise ValueError("use_dag_hierarchy and use_bilevel_hierarchy are "
                       "mutually exclusive")
    if use_bilevel_hierarchy:
      self._init_bilevel(where)
    if use_dag_hierarchy:
      self._init_dag(where)

  def _check_class_sizes(self, counts, rel_ids, where):
    """Every usable class must fit the requested shots and queries."""
    cfg = self.config
    max_support = cfg.max_num_support
    if max_support is not None and cfg.num_query is not None:
      need, keys = max_support + cfg.num_query, "num_support + num_query"
    elif max_support is not None:
      need, keys = max_support + 1, "num_support + 1 (one query)"
    elif cfg.num_query is not None:
      need, keys = cfg.num_query + 1, "num_query + 1 (one support)"
    else:
      need, keys = 2, "2 (one support and one query)"
    small = np.flatnonzero(counts < need)
    if len(small):
      names = ", ".join(
          _class_label(self.dataset_spec, self.class_set[rel_ids[i]])
          + f" has {counts[i]}" for i in small[:3])
      raise ValueError(
          f"EpisodeDescriptionConfig asks for {keys} = {need} images per "
          f"class, but {len(small)} classes of {where} have fewer: {names}. "
          "Lower the shots or set min_examples_in_class to drop them.")

  def _init_bilevel(self, where):
    spec, cfg = self.dataset_spec, self.config
    if self.num_ways is not None:
      raise ValueError("use_bilevel_hierarchy is incompatible with "
                       "EpisodeDescriptionConfig.num_ways")
    if cfg.min_examples_in_class > 0:
      raise ValueError("use_bilevel_hierarchy is incompatible with "
                       "EpisodeDescriptionConfig.min_examples_in_class")
    if not spec_lib.has_bilevel_ontology(spec):
      raise ValueError(f"use_bilevel_hierarchy needs a bi-level spec; "
                       f"'{spec.name}' is not one")
    self.superclass_set = np.array(spec.get_superclasses(self.split))
    for i in self.superclass_set:
      if spec.classes_per_superclass[i] < cfg.min_ways:
        raise ValueError(
            f"EpisodeDescriptionConfig.min_ways={cfg.min_ways} but superclass "
            f"{i} ({spec.superclass_names[i]}) of {where} has only "
            f"{spec.classes_per_superclass[i]} classes")

  def _init_dag(self, where):
    spec, cfg = self.dataset_spec, self.config
    if self.num_ways is not None:
      raise ValueError("use_dag_hierarchy is incompatible with "
                       "EpisodeDescriptionConfig.num_ways")
    if not spec_lib.has_dag_ontology(spec):
      raise ValueError(f"use_dag_hierarchy needs a hierarchical spec; "
                       f"'{spec.name}' is not one")
    graph = spec.get_split_subgraph(self.split)
    offset = self.class_set.start
    usable = set(self._filtered_rel.tolist())
    spans = graph.spanning_leaves
    self.span_leaves_rel = []
    # Deterministic order: internal nodes and their leaves by WordNet id.
    for node in graph.internal_nodes:
      rel = [spec.class_names_to_ids[leaf] - offset
             for leaf in sorted(spans[node])]
      rel = [r for r in rel if r in usable]
      if cfg.min_ways <= len(rel) <= MAX_SPANNING_LEAVES_ELIGIBLE:
        self.span_leaves_rel.append(np.array(rel, dtype=np.int64))
    if not self.span_leaves_rel:
      raise ValueError(
          f"no node of the DAG of {where} spans between min_ways="
          f"{cfg.min_ways} and {MAX_SPANNING_LEAVES_ELIGIBLE} usable classes")

  def _use_hierarchy(self) -> bool:
    p = self.config.ignore_hierarchy_probability
    if self._legacy:  # Upstream draws this coin even when p is 0.
      return bool(self._rng.legacy.choice([True, False], p=[1.0 - p, p]))
    return not p or self._rng.uniform() >= p

  def sample_class_ids(self) -> np.ndarray:
    """Split-relative class ids of one episode (see module docstring)."""
    cfg, rng = self.config, self._rng
    if self.use_dag_hierarchy and self._use_hierarchy():
      leaves = self.span_leaves_rel[rng.integers(len(self.span_leaves_rel))]
      if len(leaves) > cfg.max_ways_upper_bound:
        leaves = rng.choice(leaves, cfg.max_ways_upper_bound, replace=False)
      return leaves
    if self.use_bilevel_hierarchy and self._use_hierarchy():
      spec = self.dataset_spec
      if self._legacy:  # Upstream's call, a 1-element draw.
        superclass = int(rng.legacy.choice(self.superclass_set, 1)[0])
      else:
        superclass = int(self.superclass_set[rng.integers(
            len(self.superclass_set))])
      size = spec.classes_per_superclass[superclass]
      ways = sample_num_ways_uniformly(size, cfg.min_ways,
                                       cfg.max_ways_upper_bound, rng)
      inds = rng.choice(size, ways, replace=False)
      rel, _ = spec.get_class_ids_from_superclass_subclass_inds(
          self.split, superclass, inds)
      return np.array(rel, dtype=np.int64)
    if self.use_all_classes:
      return np.arange(self.num_classes, dtype=np.int64)
    ways = self.num_ways
    if ways is None:
      ways = sample_num_ways_uniformly(len(self._filtered_rel), cfg.min_ways,
                                       cfg.max_ways_upper_bound, rng)
    return rng.choice(self._filtered_rel, ways, replace=False)

  def sample_episode_description(self) -> EpisodeDescription:
    """Classes and per-class support/query counts of one episode."""
    cfg, rng = self.config, self._rng
    class_ids = np.asarray(self.sample_class_ids(), dtype=np.int64)
    images = self._images_per_rel_class[class_ids]
    if cfg.num_query is not None:
      num_query = cfg.num_query
    else:
      num_query = compute_num_query(images, cfg.max_num_query,
                                    cfg.num_support)
    ns = cfg.num_support
    if ns is not None:
      if isinstance(ns, tuple):
        ns = int(rng.integers(ns[0], ns[1] + 1))
      support = np.full(len(class_ids), ns, dtype=np.int64)
      size = int(support.sum())
    else:
      remaining = images - num_query
      size = sample_support_set_size(
          remaining, cfg.max_support_size_contrib_per_class,
          cfg.max_support_set_size, rng)
      support = sample_num_support_per_class(
          images, remaining, size, cfg.min_log_weight, cfg.max_log_weight,
          rng)
    query = np.full(len(class_ids), num_query, dtype=np.int64)
    return EpisodeDescription(class_ids, support, query, size)

  # Static bounds, used to size padding buckets and logit widths.

  def max_ways(self) -> int:
    """Largest number of ways any episode of this sampler can have."""
    cfg = self.config
    if self.num_ways is not None:
      return self.num_ways
    bounds = []
    p = cfg.ignore_hierarchy_probability
    hierarchical = self.use_dag_hierarchy or self.use_bilevel_hierarchy
    if self.use_dag_hierarchy:
      bounds.append(max(len(s) for s in self.span_leaves_rel))
    if self.use_bilevel_hierarchy:
      bounds.append(max(self.dataset_spec.classes_per_superclass[int(i)]
                        for i in self.superclass_set))
    if not hierarchical or p > 0:
      bounds.append(len(self._filtered_rel))
    return min(cfg.max_ways_upper_bound, max(bounds))

  def max_query_per_class(self) -> int:
    cfg = self.config
    if cfg.num_query is not None:
      return cfg.num_query
    n = self._images_per_rel_class[self._filtered_rel].max()
    if cfg.num_support is None:
      return int(min(cfg.max_num_query, n // 2))
    return int(min(cfg.max_num_query, n - cfg.max_num_support))

  def max_support_size(self) -> int:
    """Largest support set (sum of per-class supports) of any episode."""
    cfg = self.config
    if cfg.num_support is not None:
      return self.max_ways() * cfg.max_num_support
    # Per-class supports sum to at most the sampled support-set size.
    n = self._images_per_rel_class[self._filtered_rel].max()
    per_class = min(cfg.max_support_size_contrib_per_class, n - 1)
    return int(min(cfg.max_support_set_size, self.max_ways() * per_class))

  def max_query_size(self) -> int:
    return self.max_ways() * self.max_query_per_class()


def description_stream(sampler: EpisodeDescriptionSampler,
                       rng: np.random.Generator):
  """Endless descriptions, honouring the config's repetition options.

  `num_unique_descriptions` > 0 pre-samples that many descriptions and
  cycles through them in a fresh random order each time (upstream shuffles
  its pre-sampled pool); each description is repeated
  `episode_description_switch_frequency` times in a row.

  Args:
    sampler: the source's sampler.
    rng: draws the pool orders.

  Yields:
    `EpisodeDescription`s.
  """
  cfg = sampler.config
  repeat = cfg.episode_description_switch_frequency
  if cfg.num_unique_descriptions:
    pool = [sampler.sample_episode_description()
            for _ in range(cfg.num_unique_descriptions)]
    while True:
      for i in rng.permutation(len(pool)):
        for _ in range(repeat):
          yield pool[i]
  while True:
    d = sampler.sample_episode_description()
    for _ in range(repeat):
      yield d


def max_ways(episode_config: EpisodeDescriptionConfig, dataset_spec=None,
             split=spec_lib.Split.TRAIN) -> int:
  """Static upper bound on the ways of any episode (for the logit width).

  Args:
    episode_config: an `EpisodeDescriptionConfig`.
    dataset_spec: None (then the config's bound, `num_ways or
      max_ways_upper_bound`, as upstream), one spec, or a list of specs
      (multi-source: the maximum over sources).
    split: the split episodes come from.

  Returns:
    An int >= the ways of every episode the samplers can produce.
  """
  if dataset_spec is None:
    return episode_config.max_ways
  specs = (dataset_spec if isinstance(dataset_spec, Sequence)
           else [dataset_spec])
  return max(EpisodeDescriptionSampler(s, split, episode_config).max_ways()
             for s in specs)
