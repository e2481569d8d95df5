"""The compile budget (issue 22): a paper run compiles at most 150 programs.

Training fits at most `num_buckets**2` shapes to its sources; validation, the
final test on the ten Meta-Dataset sources and `ctx-eval` share one list of
`eval_num_shapes` shapes. Checked on the official dataset specs at 1, 8 and
16 devices, without compiling anything.
"""

import numpy as np
import pytest

from ctx_jax.data import compile_plan
from experiments import common
from experiments import ctx_all
from experiments import ctx_ilsvrc
from experiments import ctx_simclr
from experiments import protonet_ilsvrc
from meta_dataset_pipeline import dataset_spec
from meta_dataset_pipeline import padding

CONFIGS = {"ctx_ilsvrc": ctx_ilsvrc, "ctx_simclr": ctx_simclr,
           "ctx_all": ctx_all, "protonet_ilsvrc": protonet_ilsvrc}


@pytest.fixture(scope="module")
def load_spec(shared_dir):
  specs = shared_dir / "fixtures" / "official_specs" / "dataset_specs"
  cache = {}

  def load(source):
    if source not in cache:
      cache[source] = dataset_spec.load_dataset_spec(
          str(specs / f"{source}_dataset_spec.json"))
    return cache[source]
  return load


@pytest.mark.parametrize("num_devices", [1, 8, 16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_configs_compile_at_most_150_programs(name, num_devices,
                                                    load_spec):
  config = CONFIGS[name].get_config()
  assert set(config.data.test_sources) == set(common.MD_TEST_SOURCES)
  train = compile_plan.train_buckets(config, load_spec, num_devices)
  shared = compile_plan.shared_eval_buckets(config, load_spec, num_devices)
  assert train.num_programs + shared.num_programs <= compile_plan.MAX_PROGRAMS
  for s, q in shared.pairs:
    assert s % num_devices == 0 and q % num_devices == 0
  # Every producible evaluation episode fits: the largest one of each set.
  samplers = compile_plan.samplers_for(
      config.data.eval_episode, compile_plan.eval_sources(config), load_spec)
  top_s = max(s.max_support_size() for s in samplers)
  top_q = max(s.max_query_size() for s in samplers)
  assert shared.pick(top_s, top_q) == (padding.round_up(top_s, num_devices),
                                       padding.round_up(top_q, num_devices))


def test_shared_shapes_are_the_same_for_every_split_and_process(load_spec):
  config = ctx_ilsvrc.get_config()
  a = compile_plan.shared_eval_buckets(config, load_spec, 8)
  b = compile_plan.shared_eval_buckets(config, load_spec, 8)
  assert a == b  # Fitted with a fixed seed: every process agrees.
  # A source the config does not name is added to the fit, not refused.
  config.data.test_sources = ("ilsvrc_2012",)
  extra = compile_plan.shared_eval_buckets(config, load_spec, 8,
                                           [("omniglot", "TEST")])
  assert extra.num_programs <= compile_plan.eval_num_shapes(config)


def test_eval_num_shapes_zero_keeps_per_source_buckets(load_spec):
  config = ctx_ilsvrc.get_config()
  config.data.eval_num_shapes = 0
  assert compile_plan.shared_eval_buckets(config, load_spec, 1) is None


def test_fitted_pairs_pick_the_fewest_padded_rows():
  rng = np.random.default_rng(0)
  support = rng.integers(5, 200, 2000)
  query = np.minimum(support + rng.integers(0, 50, 2000), 250)
  buckets = padding.fitted_pairs(support, query, 12, 200, 250, multiple=4)
  assert buckets.num_programs <= 12
  assert (200, 252) in buckets.pairs
  for s, q in zip(support[:200], query[:200]):
    ps, pq = buckets.pick(s, q)
    assert ps >= s and pq >= q and ps % 4 == 0 and pq % 4 == 0
    assert ps + pq == min(a + b for a, b in buckets.pairs
                          if a >= s and b >= q)
  with pytest.raises(ValueError, match="exceeds every bucket pair"):
    buckets.pick(201, 5)
  # Fewer padded rows than the product of per-set buckets of as many
  # programs (3 x 4 = 12).
  product = padding.EpisodeBuckets(
      padding.fitted_buckets(support, 3, 200, 4, relative=True),
      padding.fitted_buckets(query, 4, 250, 4, relative=True))
  rows = lambda b: sum(sum(b.pick(s, q)) for s, q in zip(support, query))
  assert rows(buckets) < rows(product)


def test_plan_command_prints_programs_and_flops(shared_dir, tmp_path):
  """The command of issue 22: programs and padded FLOPs, nothing compiled."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  output = tmp_path / "plan.json"
  out = subprocess.run(
      [sys.executable, "benchmarks/compile_plan_bench.py", "--config",
       "experiments/ctx_ilsvrc.py", "--num_devices", "8", "--specs",
       str(shared_dir / "fixtures" / "official_specs" / "dataset_specs"),
       "--output", str(output)], cwd=root, check=True, capture_output=True,
      text=True).stdout
  assert "ctx_ilsvrc on 8 device(s)" in out and "at most 149" in out
  assert "eval (S, Q) shapes: [(" in out
  (row,) = json.loads(output.read_text())
  assert row["programs_per_run"]["after_bound"] <= compile_plan.MAX_PROGRAMS
  assert row["eval_after"]["flops_overhead"] < 1.15
  assert row["programs_per_run"]["before_seen"] > 500
