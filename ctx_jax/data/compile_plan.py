"""Which step programs a run compiles: its padding buckets, per device count.

A compiled train or eval step exists per padded episode shape `(S, Q)` that
occurs, so the buckets bound the programs (issue 22: at most 150 per run of
any paper config, training, validation and the final test together).

- Training: the buckets of the training sources (`config.data.num_buckets`
  per set, fitted to the training episodes, as before): at most
  `num_buckets**2` programs, 92 seen for ILSVRC.
- Evaluation (validation during training, the final test, `ctx-eval`): one
  list of `config.data.eval_num_shapes` allowed `(S, Q)` shapes shared by
  every evaluated source and split (`padding.fitted_pairs`, fitted to the
  pooled episode sizes of the VALID split of `valid_sources` and the TEST
  split of `test_sources`), so all evaluation compiles at most
  `eval_num_shapes` programs; before, each source and split fitted its own
  buckets (about 70 programs for the ILSVRC validation and 750 for the ten
  test sources). `eval_num_shapes = 0` brings back the per-source buckets.

The buckets depend only on the config, the specs and the device count
(fitted on samples drawn with a fixed seed), so every process, the training
run and a later `ctx-eval` compute the same ones and share compiled
programs through the persistent cache. `benchmarks/compile_plan_bench.py`
prints the plan and its expected padded FLOPs without compiling.
"""

import dataclasses
from typing import Callable, Mapping, Sequence

import ml_collections

from meta_dataset_pipeline import padding
from meta_dataset_pipeline import sampling

# 49 shared evaluation shapes, beside at most 10 x 10 training programs:
# 149 in all. Their padded-FLOPs overhead over the ten test sources and the
# ILSVRC validation: 1.10x (1 device) to 1.11x (16); benchmarks/RESULTS.md.
DEFAULT_EVAL_NUM_SHAPES = 49
MAX_PROGRAMS = 150


def eval_num_shapes(config: ml_collections.ConfigDict) -> int:
  return int(config.data.get("eval_num_shapes", DEFAULT_EVAL_NUM_SHAPES))


def _episode_config(cfg: ml_collections.ConfigDict
                    ) -> sampling.EpisodeDescriptionConfig:
  return sampling.EpisodeDescriptionConfig(**cfg.to_dict())


def eval_sources(config: ml_collections.ConfigDict,
                 extra_pairs: Sequence[tuple[str, str]] = ()
                 ) -> list[tuple[str, str]]:
  """(source, split) pairs the shared evaluation buckets are fitted to.

  The VALID split of the valid sources, the TEST split of the test sources
  and `extra_pairs` (a `ctx-eval` of a source or split the config does not
  name).
  """
  pairs = [(s, "VALID") for s in config.data.valid_sources]
  for pair in ([(s, "TEST") for s in config.data.test_sources]
               + [tuple(p) for p in extra_pairs]):
    if pair not in pairs:
      pairs.append(pair)
  return pairs


def samplers_for(config_episode: ml_collections.ConfigDict,
                 pairs: Sequence[tuple[str, str]],
                 load_spec: Callable[[str], object],
                 strict: bool = True) -> list:
  """Episode samplers (seed 0; only their size distribution is used).

  `load_spec(source)` returns the source's spec, or None to leave the
  source out (e.g. its records are missing: then only that source's
  evaluation fails, as before). With `strict` False, a split that cannot
  give episodes of this config (too few classes) is left out too: it fails
  when it is evaluated, not the others.
  """
  cfg = _episode_config(config_episode)
  samplers = []
  for source, split in pairs:
    spec = load_spec(source)
    if spec is None:
      continue
    try:
      samplers.append(sampling.EpisodeDescriptionSampler(spec, split, cfg,
                                                         seed=0))
    except ValueError:
      if strict:
        raise
  return samplers


def train_buckets(config: ml_collections.ConfigDict,
                  load_spec: Callable[[str], object],
                  pad_multiple: int) -> padding.EpisodeBuckets:
  """The training buckets, exactly as the pipeline computes them."""
  samplers = samplers_for(config.data.train_episode,
                          [(s, "TRAIN") for s in config.data.train_sources],
                          load_spec)
  return padding.buckets_for_samplers(
      samplers, pad_multiple, num_buckets=int(config.data.num_buckets))


def shared_eval_buckets(config: ml_collections.ConfigDict,
                        load_spec: Callable[[str], object],
                        pad_multiple: int,
                        extra_pairs: Sequence[tuple[str, str]] = ()
                        ) -> padding.EpisodeBuckets | None:
  """Buckets shared by all evaluation episodes; None: per-source buckets."""
  num = eval_num_shapes(config)
  if num <= 0:
    return None
  samplers = samplers_for(config.data.eval_episode,
                          eval_sources(config, extra_pairs), load_spec,
                          strict=False)
  if not samplers:  # Nothing can be evaluated: let the pipeline say why.
    return None
  return padding.pair_buckets_for_samplers(samplers, num, pad_multiple)


_EVAL_BUCKETS = {}


def cached_eval_buckets(config: ml_collections.ConfigDict,
                        load_spec: Callable[[str], object],
                        pad_multiple: int,
                        extra_pairs: Sequence[tuple[str, str]] = ()
                        ) -> padding.EpisodeBuckets | None:
  """`shared_eval_buckets`, fitted once per config and device count.

  Validation runs every `valid_every` steps; the fit (about a second) is not
  repeated.
  """
  data = config.data
  key = (data.eval_episode.to_json(), tuple(data.valid_sources),
         tuple(data.test_sources), tuple(map(tuple, extra_pairs)),
         eval_num_shapes(config), str(data.records_root),
         str(data.get("format", "records")), pad_multiple)
  if key not in _EVAL_BUCKETS:
    _EVAL_BUCKETS[key] = shared_eval_buckets(config, load_spec, pad_multiple,
                                             extra_pairs)
  return _EVAL_BUCKETS[key]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The programs one run of a config compiles at a device count."""
  num_devices: int
  train: padding.EpisodeBuckets
  eval: padding.EpisodeBuckets | None
  # Before issue 22 (or with eval_num_shapes=0): one set per source, split.
  per_source_eval: Mapping[tuple[str, str], padding.EpisodeBuckets]

  @property
  def programs_bound(self) -> int:
    """Train-step plus eval-step programs at most (the compile budget)."""
    if self.eval is None:
      return self.train.num_programs + sum(
          b.num_programs for b in self.per_source_eval.values())
    return self.train.num_programs + self.eval.num_programs


def plan(config: ml_collections.ConfigDict,
         load_spec: Callable[[str], object], num_devices: int) -> Plan:
  """Buckets of training, shared evaluation and per-source evaluation."""
  per_source = {}
  cfg = config.data.eval_episode
  for pair in eval_sources(config):
    per_source[pair] = padding.buckets_for_samplers(
        samplers_for(cfg, [pair], load_spec), num_devices,
        num_buckets=int(config.data.num_buckets))
  return Plan(num_devices, train_buckets(config, load_spec, num_devices),
              shared_eval_buckets(config, load_spec, num_devices),
              per_source)
