"""Padding policy: fitted buckets and the logit width of the steps."""

import itertools

import jax
import numpy as np
import pytest

from ctx_jax import mesh as mesh_lib
from ctx_jax.models import episode as episode_lib
from ctx_jax.training import sharded_step
from ctx_jax.training import state as state_lib
from experiments import demo
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import sampling
import meta_dataset_pipeline as mdp
from tests import fakes


def _padding_of(sizes, buckets, multiple, relative=False):
  rounded = [padding.round_up(s, multiple) for s in sizes]
  return sum((min(b for b in buckets if b >= r) - r) / (r if relative else 1)
             for r in rounded)


def test_fitted_buckets_are_optimal():
  rng = np.random.default_rng(0)
  for _ in range(150):
    sizes = rng.integers(1, 30, rng.integers(1, 15))
    top = int(rng.integers(sizes.max(), 35))
    k, multiple = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    relative = bool(rng.integers(2))
    got = padding.fitted_buckets(sizes, k, top, multiple, relative)
    assert got[-1] == padding.round_up(top, multiple) and len(got) <= k
    assert all(b % multiple == 0 for b in got)
    # Brute force over every choice of the other k-1 buckets.
    candidates = sorted({padding.round_up(s, multiple) for s in sizes}
                        - {got[-1]})
    best = min(_padding_of(sizes, tuple(c) + (got[-1],), multiple, relative)
               for r in range(k)
               for c in itertools.combinations(candidates, r))
    assert _padding_of(sizes, got, multiple, relative) == pytest.approx(best)


def test_fitted_buckets_input_checks():
  with pytest.raises(ValueError, match="num_buckets"):
    padding.fitted_buckets([3], 0, 10)
  with pytest.raises(ValueError, match="exceeds"):
    padding.fitted_buckets([30], 2, 10)


@pytest.fixture(scope="module")
def ilsvrc_sampler(shared_dir):
  spec = mdp.load_dataset_spec(
      shared_dir / "fixtures" / "official_specs" / "dataset_specs" /
      "ilsvrc_2012_dataset_spec.json")
  cfg = sampling.EpisodeDescriptionConfig(ignore_hierarchy_probability=0.5)
  return lambda seed: sampling.EpisodeDescriptionSampler(spec, "TRAIN", cfg,
                                                         seed=seed)


def test_fitted_policy_pads_less_and_leaves_the_stream_alone(ilsvrc_sampler):
  sampler, twin = ilsvrc_sampler(3), ilsvrc_sampler(3)
  fitted = padding.buckets_for_samplers([sampler], 8, num_buckets=10)
  geometric = padding.buckets_for_samplers([sampler], 8)
  assert len(fitted.support) <= 10 and len(fitted.query) <= 10
  assert fitted.support[-1] == 504 and fitted.query[-1] == 504
  # Fitting samples copies: the caller's episode stream is unchanged.
  for _ in range(5):
    a, b = (sampler.sample_episode_description(),
            twin.sample_episode_description())
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(a.num_support, b.num_support)
  # Deterministic, every producible episode fits, less padding than the
  # geometric buckets on fresh episodes.
  assert padding.buckets_for_samplers([sampler], 8, num_buckets=10) == fitted
  waste = lambda b: padding.padding_waste([ilsvrc_sampler(9)], b, 3000)
  assert waste(fitted)["total"] < 0.07 < waste(geometric)["total"]


def test_logit_width_caps_ways_at_the_support_rows():
  config = demo.get_config("smoke")
  config.model.query_dim = config.model.val_dim = 16
  episode = fakes.fake_episode(8, 8, ways=4, real_support=6, real_query=7)
  assert episode_lib.logit_width(500, episode) == 8
  assert episode_lib.logit_width(5, episode) == 5
  mesh = mesh_lib.make_mesh(2)
  dev = mesh_lib.shard_episode(episode, mesh, episode_lib.MODEL_INPUT_KEYS)
  model, _ = state_lib.create_train_state(config, mesh)
  model.eval()
  _, eval_fn = sharded_step.select_steps("shard_map", mesh)
  with jax.set_mesh(mesh):
    # 500 requested ways compute as 8: the same metrics as 4 exact ways.
    wide = jax.device_get(eval_fn(model, dev, 500))
    exact = jax.device_get(eval_fn(model, dev, 4))
  for key in ("loss", "accuracy"):
    np.testing.assert_allclose(wide[key], exact[key], rtol=1e-6)
