r"""CTX on the embedded demo dataset (procedural glyphs), on a CPU.

Command (after `ctx-make-demo-data --output_dir demo_data/glyphs`):

  ctx-train --config experiments/demo.py --workdir runs/demo_ctx

Hardware: a 2-core CPU. Runtime: about 4 minutes of training plus a 1-minute
evaluation. Expected result: see the README's demo table (5-way 5-shot test
episodes; chance is 20%).

Same code path as the paper model: a ResNet with the official blocks and
episodic batch norm (resnet_tiny: one block per stage, narrow widths,
max_stride=8 so 48x48 inputs give 6x6 feature maps, as 84x84 inputs do at
stride 16) and the CrossTransformer head; the official optimiser with a larger
learning rate for the short schedule.

Config argument: `experiments/demo.py:smoke` (tiny, for tests),
`experiments/demo.py:head=protonet` (the baseline, same everything else),
`experiments/demo.py:simclr` (CTX+SimCLR Eps: half of the training episodes
are SimCLR episodes; combine as `simclr,smoke`).
"""

from experiments import common


def get_config(arg: str | None = None):
  """Returns the demo config; see the module docstring for arguments."""
  arg = common.parse_arg(arg, head="ctx", smoke=False, simclr=False)
  config = common.get_base_config()
  config.data.records_root = "demo_data"
  config.data.train_sources = ("glyphs",)
  config.data.valid_sources = ("glyphs",)
  config.data.test_sources = ("glyphs",)
  config.data.image_size = 48
  config.data.train_episode = common.episode_config(
      num_ways=5, num_support=5, num_query=5)
  config.data.eval_episode = common.episode_config(
      num_ways=5, num_support=5, num_query=10)
  config.data.shuffle_buffer_size = 100

  config.model.backbone = "resnet_tiny"
  config.model.max_stride = 8
  config.model.head = arg.head
  config.model.query_dim = 64
  config.model.val_dim = 64

  config.optimizer.learning_rate = 2e-3
  config.optimizer.decay_every = 400
  config.optimizer.decay_rate = 0.5
  config.optimizer.weight_decay = 1e-4

  config.train.num_steps = 1000
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.train.valid_every = 500
  config.train.num_valid_episodes = 50
  config.eval.num_episodes = 300
  if arg.smoke:
    common.apply_smoke(config)
  if arg.simclr:
    if arg.smoke:  # Two shots, so a SimCLR episode has more ways than 2.
      config.data.train_episode.num_support = 2
    config.data.train_episode.simclr_episode_fraction = 0.5
  return config
