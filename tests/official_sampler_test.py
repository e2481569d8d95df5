"""`rng="official"`: the official sampler's episode descriptions, exactly.

`official_sampler/descriptions.json` was written by running the official
sampler (`official_sampler/make_fixture.py` says how): flat, fixed-shot,
shot-range, bi-level (Omniglot), DAG (ILSVRC, also with hierarchy ignored
half the time) and a second source built after a first one.
"""

import json
import pathlib

import numpy as np
import pytest

import meta_dataset_pipeline as mdp
from meta_dataset_pipeline import sampling

FIXTURE = pathlib.Path(__file__).parent / "official_sampler" / (
    "descriptions.json")
CASES = json.loads(FIXTURE.read_text())["cases"]


def _spec(shared_dir, name):
  return mdp.load_dataset_spec(
      shared_dir / "fixtures" / "official_specs" / "dataset_specs" /
      f"{name}_dataset_spec.json")


def _config(overrides, rng="official"):
  overrides = dict(overrides)
  if isinstance(overrides.get("num_support"), list):
    overrides["num_support"] = tuple(overrides["num_support"])
  return mdp.EpisodeDescriptionConfig(rng=rng, **overrides)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_official_rng_reproduces_official_descriptions(shared_dir, case):
  rngs = sampling.official_rngs(case["seed"], len(case["sources"]))
  sampler = mdp.EpisodeDescriptionSampler(
      _spec(shared_dir, case["sources"][-1]), case["split"],
      _config(case["episode"]), seed=rngs[-1],
      use_dag_hierarchy=case["use_dag_hierarchy"],
      use_bilevel_hierarchy=case["use_bilevel_hierarchy"])
  for i, want in enumerate(case["episodes"]):
    d = sampler.sample_episode_description()
    got = np.stack([d.class_ids, d.num_support, d.num_query], 1).tolist()
    assert got == want, f"episode {i}"


def test_default_generator_differs_and_rng_is_checked(shared_dir):
  case = CASES[0]
  sampler = mdp.EpisodeDescriptionSampler(
      _spec(shared_dir, case["sources"][0]), case["split"],
      _config(case["episode"], rng="generator"), seed=case["seed"])
  d = sampler.sample_episode_description()
  got = np.stack([d.class_ids, d.num_support, d.num_query], 1).tolist()
  assert got != case["episodes"][0]
  with pytest.raises(ValueError, match="rng"):
    mdp.EpisodeDescriptionConfig(rng="legacy")


def test_md_episodes_official_rng(shared_dir, tmp_path):
  from meta_dataset_pipeline import episodes_cli  # pylint: disable=g-import-not-at-top
  case = next(c for c in CASES if c["name"] == "aircraft_5w5s")
  out = tmp_path / "d.json"
  spec = (shared_dir / "fixtures" / "official_specs" / "dataset_specs" /
          "aircraft_dataset_spec.json")
  episodes_cli.main([str(spec), "--split", case["split"], "--rng",
                     "official", "--seed", str(case["seed"]),
                     "--num_episodes", "3", "--num_ways", "5",
                     "--num_support", "5", "--num_query", "10",
                     "--output", str(out)])
  got = [np.stack([e["class_ids"], e["num_support"], e["num_query"]],
                  1).tolist() for e in json.loads(out.read_text())["episodes"]]
  assert got == case["episodes"][:3]
