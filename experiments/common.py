"""The base config every experiment starts from, and config-argument parsing.

Every field is overridable from the command line (`--config.optimizer.
learning_rate=1e-4`); the config is locked, so a mistyped key is an error.
Defaults are the official CTX ImageNet hyperparameters (gin resolved, see
ALIGNMENT.md in the shared folder): Adam at 6e-4, staircase decay by
0.915193802145601 every 2000 steps, normalised gradient descent, weight decay
8.85787420909229e-05, 224x224 images, official variable-way variable-shot
episodes.
"""

import math

import ml_collections
from ml_collections import config_dict

from ctx_jax import models


def episode_config(**overrides) -> ml_collections.ConfigDict:
  """Episode description fields, official names and defaults.

  `num_ways`, `num_support` and `num_query` left unset (None) mean variable
  way / shot as in the official sampler.
  """
  cfg = ml_collections.ConfigDict({
      "num_ways": config_dict.placeholder(int),
      "num_support": config_dict.placeholder(int),
      "num_query": config_dict.placeholder(int),
      "min_ways": 5,
      "max_ways_upper_bound": 50,
      "max_num_query": 10,
      "max_support_set_size": 500,
      "max_support_size_contrib_per_class": 100,
      "min_log_weight": math.log(0.5),
      "max_log_weight": math.log(2),
      "ignore_dag_ontology": False,
      "ignore_bilevel_ontology": False,
      "ignore_hierarchy_probability": 0.0,
      "min_examples_in_class": 0,
      # Fraction of episodes turned into SimCLR episodes (CTX+SimCLR Eps:
      # 0.5 for training; see meta_dataset_pipeline/simclr.py).
      "simclr_episode_fraction": 0.0,
      # "official": the official sampler's RandomState scheme, so a seed
      # gives exactly its episode descriptions (default: numpy Generator).
      "rng": "generator",
  })
  cfg.update(overrides)
  return cfg


def get_base_config() -> ml_collections.ConfigDict:
  """Official CTX-on-ILSVRC settings; variants override a few fields."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Devices the episode is split over (0 = all devices of all processes).
  config.num_devices = 0
  # Export of a model (`ctx-import-official` or a finished run) whose backbone
  # initialises this run, as the official `checkpoint_to_restore` does
  # (backbone and its batch-norm statistics; not the transformer head).
  config.init_from = ""
  # JAX's persistent compilation cache: "" = ~/.cache/ctx_jax/jax_cache
  # (ctx_jax/xla_config.py), a folder, or "none" to compile every run.
  config.compilation_cache_dir = ""

  config.data = ml_collections.ConfigDict()
  # How the data was prepared (README, "Preparing data: records or TFDS"):
  # "records" (md-convert or the official converter; `records_root` holds
  # one folder of records per source, `<root>/<source>/`) or "tfds" (the
  # official TFDS builder, `tfds build`; `records_root` is its data dir,
  # holding `meta_dataset/<source>/1.0.0/` in the array_record format).
  config.data.format = "records"
  config.data.records_root = ""
  # With format "tfds": the benchmark version whose splits are used, "v1"
  # (Meta-Dataset paper) or "v2" (VTAB+MD).
  config.data.tfds_md_version = "v1"
  config.data.train_sources = ("ilsvrc_2012",)
  config.data.valid_sources = ("ilsvrc_2012",)
  config.data.test_sources = ("ilsvrc_2012",)
  config.data.image_size = 224
  # The CTX gin sets train/EpisodeDescriptionConfig.ignore_hierarchy_
  # probability = 0.5: half of the ImageNet training episodes ignore the DAG.
  config.data.train_episode = episode_config(ignore_hierarchy_probability=0.5)
  config.data.eval_episode = episode_config()
  config.data.shuffle_buffer_size = 1000
  # Padding of variable-size episodes: at most this many support sizes and
  # as many query sizes, fitted to the sampler's distribution of set sizes
  # (meta_dataset_pipeline/padding.py; one compiled step per pair that
  # occurs); 0 = geometric buckets (growth 1.5). Padded-FLOPs overhead over
  # the official ILSVRC training episodes: benchmarks/padding_flops_bench.py.
  config.data.num_buckets = 10
  # Evaluation (validation, the final test, ctx-eval) pads every source and
  # split to one shared list of at most this many (support, query) shapes,
  # so a run compiles at most 100 + 49 programs (ctx_jax/data/
  # compile_plan.py); 0 = per-source buckets as training's.
  config.data.eval_num_shapes = 49
  # Memory (MiB) for an exact cache of decoded, resized images (per process;
  # 0: off). Worth it for small sources at small image sizes, e.g. all of
  # DTD at 84x84 takes 477 MB; see benchmarks/RESULTS.md.
  config.data.decoded_cache_mb = 0
  # Processes that read, decode, augment and pad episodes for this process
  # (meta_dataset_pipeline/workers.py; same episodes for any number): -1
  # picks one per CPU this process may use, less one (0 below 4 CPUs);
  # 0 decodes in this process with tf.data threads.
  config.data.num_workers = -1
  # Augmentation of SimCLR episodes (`mdp.SimCLRAugmentation` fields; the
  # official `color_jitter_strength` flag defaults to 1.0).
  config.data.simclr = ml_collections.ConfigDict({
      "color_jitter_strength": 1.0,
      "crop_area_range": (0.08, 1.0),
      "color_jitter_probability": 0.8,
      "grayscale_probability": 0.2,
      "query_blur": True,
  })
  # Augmentation of ordinary training episodes: "none" (official CTX) or
  # "bohb" (the paper's CTX+SimCLR Eps+Aug), with the settings below.
  config.data.md_augmentation = "none"
  # Settings of "bohb" (`mdp.SimCLRAugmentation` fields, defaults of
  # `mdp.BOHB_AUGMENTATION`). The paper's exact BOHB settings were not
  # released with the official code: these are our reading (see
  # meta_dataset_pipeline/simclr.py), overridable per run, e.g.
  # --config.data.bohb.color_jitter_strength=0.3.
  config.data.bohb = ml_collections.ConfigDict({
      "color_jitter_strength": 0.5,
      "crop": True,
      "crop_area_range": (0.25, 1.0),
      "crop_aspect_ratio_range": (3 / 4, 4 / 3),
      "flip": True,
      "color_jitter_probability": 0.8,
      "grayscale_probability": 0.2,
  })
  # Where SimCLR / md augmentation runs: "host" (tf.data) or "device" (JAX
  # on the accelerator, for hosts whose CPUs cannot keep up).
  config.data.augment_on = "host"

  config.model = models.default_model_config()
  # The official recipe: truncated normal (std 0.1) conv kernels. The demo
  # figures in the README were measured with it.
  config.model.init = "official"

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 6e-4
  config.optimizer.decay_every = 2000
  config.optimizer.decay_rate = 0.915193802145601
  config.optimizer.normalized_gradient_descent = True
  config.optimizer.weight_decay = 8.85787420909229e-05
  config.optimizer.adam_b1 = 0.9
  config.optimizer.adam_b2 = 0.999
  config.optimizer.adam_epsilon = 1e-7  # Keras Adam (distributed trainer).

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 100_000
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  # Official `setups/trainer_config.gin` (included by the CTX gins):
  # validate_every = 500 on 600 episodes; the reported test figure is the
  # best validation checkpoint's (`analysis/select_best_model.py`).
  config.train.valid_every = 500
  config.train.num_valid_episodes = 600
  # How the episode is split over the devices: "shard_map" (explicit
  # collectives, as the official distributed learner: each device embeds its
  # rows, synced BN, CTX support gathered; ctx_jax/training/sharded_step.py)
  # or "gspmd" (plain jit of the single-device step with the episode sharded;
  # XLA partitions it). Same results to float32 round-off.
  config.train.parallelism = "shard_map"

  config.eval = ml_collections.ConfigDict()
  config.eval.num_episodes = 600
  config.eval.seed = 0
  # At each validation, write TensorBoard images per valid source: one
  # episode's CTX attention figure and the confusion of the validation
  # episodes (ctx_jax/eval/figures.py; one more forward pass over them).
  config.eval.attention_images = False
  return config


MD_TRAIN_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd",
                    "quickdraw", "fungi", "vgg_flower")
MD_TEST_SOURCES = MD_TRAIN_SOURCES + ("traffic_sign", "mscoco")


def parse_arg(arg: str | None, **defaults):
  """Parses `"a=1,b=x,flag"` into a ConfigDict typed by `defaults`.

  A bare name sets a boolean default to True. Unknown names are errors.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"unknown config argument '{name}'; known: "
                       f"{sorted(defaults)}")
    kind = type(defaults[name])
    if kind is bool:
      result[name] = value.lower() in ("", "1", "true", "yes")
    else:
      result[name] = kind(value)
  return result


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Tiny settings for tests and CI: 2-way 1-shot, 3 steps, no heavy eval."""
  config.data.image_size = 32
  config.data.train_episode = episode_config(num_ways=2, num_support=1,
                                             num_query=2)
  config.data.eval_episode = episode_config(num_ways=2, num_support=1,
                                            num_query=2)
  config.model.backbone = "resnet_tiny"
  config.model.max_stride = 8
  config.train.num_steps = 3
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.valid_every = 2
  config.train.num_valid_episodes = 2
  config.eval.num_episodes = 4
