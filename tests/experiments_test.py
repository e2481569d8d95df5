"""Experiment configs: load, carry the official settings, override safely."""

import importlib
import math
import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from ctx_jax import config_checks

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
CONFIG_FILES = sorted(p.stem for p in EXPERIMENTS.glob("*.py")
                      if p.stem not in ("__init__", "common"))
PAPER = ("ctx_ilsvrc", "protonet_ilsvrc", "ctx_all")
# ml_collections' config-file loader still uses importlib's load_module.
pytestmark = pytest.mark.filterwarnings(
    "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")


def _parse(*argv):
  """Parses `--config` flags the way ctx-train does (locked config)."""
  values = flags.FlagValues()
  argv = ["prog", *argv]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_with_smoke_and_overrides(name):
  module = importlib.import_module(f"experiments.{name}")
  assert module.__doc__ and "Command" in module.__doc__, name
  config = _parse(f"--config={EXPERIMENTS / name}.py:smoke",
                  "--config.optimizer.learning_rate=0.125",
                  "--config.data.records_root=/x")
  assert config.optimizer.learning_rate == 0.125
  assert config.data.records_root == "/x"
  assert config.train.num_steps <= 10  # smoke
  with pytest.raises((AttributeError, KeyError, flags.Error),
                     match="learning_rat"):
    _parse(f"--config={EXPERIMENTS / name}.py",
           "--config.optimizer.learning_rat=0.1")


def test_paper_configs_use_the_official_recipe():
  for name in PAPER:
    config = importlib.import_module(f"experiments.{name}").get_config()
    assert config.data.image_size == 224
    assert config.model.backbone == "resnet34" and config.model.max_stride == 16
    assert config.model.init == "official"
    opt = config.optimizer
    assert (opt.learning_rate, opt.decay_every) == (6e-4, 2000)
    assert math.isclose(opt.decay_rate, 0.915193802145601)
    assert math.isclose(opt.weight_decay, 8.85787420909229e-05)
    assert opt.normalized_gradient_descent
    train_ep, eval_ep = config.data.train_episode, config.data.eval_episode
    for ep in (train_ep, eval_ep):  # Variable way and shot.
      assert ep.num_ways is None and ep.num_support is None
      assert (ep.min_ways, ep.max_ways_upper_bound, ep.max_num_query,
              ep.max_support_set_size) == (5, 50, 10, 500)
    # The CTX ImageNet gin's 0.5; the official trainer refuses it with
    # several sources, so train-on-all leaves it at 0.
    assert train_ep.ignore_hierarchy_probability == (
        0.0 if name == "ctx_all" else 0.5)
    assert eval_ep.ignore_hierarchy_probability == 0.0
    assert len(config.data.test_sources) == 10
    # Official trainer_config.gin: validate every 500 updates, 600 episodes.
    assert (config.train.valid_every, config.train.num_valid_episodes) == (
        500, 600)
  get = lambda n, a=None: importlib.import_module(
      f"experiments.{n}").get_config(a)
  assert get("protonet_ilsvrc").model.head == "protonet"
  assert get("ctx_all", "head=protonet").model.head == "protonet"
  assert len(get("ctx_all").data.train_sources) == 8
  assert get("ctx_ilsvrc").data.train_sources == ("ilsvrc_2012",)


def test_unknown_config_argument_is_an_error():
  with pytest.raises(flags.IllegalFlagValueError,
                     match="unknown config argument 'hed'"):
    _parse(f"--config={EXPERIMENTS / 'ctx_all'}.py:hed=protonet")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_passes_the_start_up_checks(name):
  module = importlib.import_module(f"experiments.{name}")
  for arg in (None, "smoke"):
    config_checks.check_config(module.get_config(arg))


def test_ignore_hierarchy_only_for_single_source_ilsvrc():
  get = lambda n: importlib.import_module(f"experiments.{n}").get_config()
  config = get("ctx_all")
  config.data.train_episode.ignore_hierarchy_probability = 0.5
  with pytest.raises(ValueError, match="ignore_hierarchy_probability=0.5 "
                     "with 8 sources.*multisource"):
    config_checks.check_config(config)
  config = get("demo")  # One source, but without a hierarchy.
  config.data.train_episode.ignore_hierarchy_probability = 0.25
  with pytest.raises(ValueError, match="source 'glyphs'.*only ilsvrc_2012"):
    config_checks.check_config(config)
  config = get("ctx_ilsvrc")
  config.data.eval_episode.ignore_hierarchy_probability = 0.5
  with pytest.raises(ValueError, match="eval_episode.*'omniglot'"):
    config_checks.check_config(config)
