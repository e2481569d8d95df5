r"""Writes `descriptions.json`: episode descriptions of the OFFICIAL sampler.

Not part of the test suite: it needs the official code (google-research/
meta-dataset, any recent commit; this fixture was made at 1676095) and its
dependencies (tensorflow, gin-config), e.g.

  git -C <mirror> archive HEAD | tar -x -C /tmp/offsrc
  PYTHONPATH=/tmp/offsrc /tmp/offvenv/bin/python \
      tests/official_sampler/make_fixture.py ../shared/fixtures/official_specs

For each case it seeds the official module-level RandomState
(`sampling.RNG.seed(seed)`), builds the official samplers in order (several
for the multi-source case) and records the first episodes of the last one:
`[[class_id, num_support, num_query], ...]` per episode, class ids relative
to the split as the official sampler returns them.
"""

import json
import os
import shutil
import sys
import tempfile
import types

import gin
import numpy as np

# gin-config's gin.tf imports tf.estimator (gone in TF 2.16+); the sampler
# does not need it.
sys.modules["gin.tf"] = types.ModuleType("gin.tf")
gin.tf = sys.modules["gin.tf"]

# pylint: disable=g-import-not-at-top,wrong-import-position
from meta_dataset.data import config as config_lib
from meta_dataset.data import dataset_spec as spec_lib
from meta_dataset.data import learning_spec
from meta_dataset.data import sampling

NUM_EPISODES = 12
DEFAULTS = dict(num_ways=None, num_support=None, num_query=None, min_ways=5,
                max_ways_upper_bound=50, max_num_query=10,
                max_support_set_size=500,
                max_support_size_contrib_per_class=100,
                min_log_weight=-0.69314718055994529,
                max_log_weight=0.69314718055994529, ignore_dag_ontology=False,
                ignore_bilevel_ontology=False,
                ignore_hierarchy_probability=0.0, simclr_episode_fraction=0.0)
# name, sources, split, episode overrides, dag, bilevel, seed
CASES = [
    ("aircraft_variable", ["aircraft"], "TRAIN", {}, False, False, 0),
    ("aircraft_5w5s", ["aircraft"], "TEST",
     {"num_ways": 5, "num_support": 5, "num_query": 10}, False, False, 3),
    ("aircraft_support_range", ["aircraft"], "VALID",
     {"num_ways": 5, "num_support": [1, 5], "num_query": 5}, False, False, 7),
    ("omniglot_bilevel", ["omniglot"], "TRAIN", {}, False, True, 1),
    ("ilsvrc_dag", ["ilsvrc_2012"], "TRAIN", {}, True, False, 2),
    ("ilsvrc_dag_ignore_half", ["ilsvrc_2012"], "TRAIN",
     {"ignore_hierarchy_probability": 0.5}, True, False, 5),
    ("ilsvrc_flat_test", ["ilsvrc_2012"], "TEST", {}, False, False, 4),
    ("second_source", ["aircraft", "dtd"], "TRAIN", {}, False, False, 11),
]


def load_spec(specs_dir, name, tmp):
  """The official spec of `name`, from the fixtures' JSON files."""
  folder = os.path.join(tmp, name)
  os.makedirs(folder, exist_ok=True)
  src = os.path.join(specs_dir, "dataset_specs")
  shutil.copy(os.path.join(src, f"{name}_dataset_spec.json"),
              os.path.join(folder, "dataset_spec.json"))
  leaves = os.path.join(src, f"{name}_num_leaf_images.json")
  if os.path.exists(leaves):
    shutil.copy(leaves, os.path.join(folder, "num_leaf_images.json"))
  spec = spec_lib.load_dataset_spec(folder)
  if isinstance(spec, spec_lib.HierarchicalDatasetSpecification):
    spec.initialize(restricted_classes_per_split=None)
  return spec


def main(specs_dir, out_path):
  out = {"official_commit": "1676095", "num_episodes": NUM_EPISODES,
         "cases": []}
  with tempfile.TemporaryDirectory() as tmp:
    for name, sources, split, overrides, dag, bilevel, seed in CASES:
      kwargs = dict(DEFAULTS, **overrides)
      if isinstance(kwargs["num_support"], list):
        kwargs["num_support"] = tuple(kwargs["num_support"])
      episode_config = config_lib.EpisodeDescriptionConfig(**kwargs)
      split_enum = getattr(learning_spec.Split, split)
      sampling.RNG.seed(seed)
      samplers = [sampling.EpisodeDescriptionSampler(
          load_spec(specs_dir, s, tmp), split_enum, episode_config,
          use_dag_hierarchy=dag, use_bilevel_hierarchy=bilevel,
          ignore_hierarchy_probability=kwargs["ignore_hierarchy_probability"])
                  for s in sources]
      for sampler in samplers:
        if getattr(sampler, "span_leaves_rel", None):
          # Upstream passes a ragged list of arrays to RandomState.choice,
          # which numpy < 1.24 turned into an object array; NumPy 2 refuses.
          # The same object array by hand: identical draws (choice of a
          # 1-D population without p is one `randint(0, n)`).
          leaves = sampler.span_leaves_rel
          sampler.span_leaves_rel = np.empty(len(leaves), dtype=object)
          sampler.span_leaves_rel[:] = leaves
      episodes = [[[int(c), int(s), int(q)]
                   for c, s, q in samplers[-1].sample_episode_description()]
                  for _ in range(NUM_EPISODES)]
      out["cases"].append({
          "name": name, "sources": sources, "split": split,
          "episode": overrides, "use_dag_hierarchy": dag,
          "use_bilevel_hierarchy": bilevel, "seed": seed,
          "episodes": episodes})
      print(name, [len(e) for e in episodes], flush=True)
  with open(out_path, "w") as f:
    json.dump(out, f, separators=(",", ":"))
    f.write("\n")


if __name__ == "__main__":
  main(sys.argv[1], os.path.join(os.path.dirname(__file__),
                                 "descriptions.json"))
