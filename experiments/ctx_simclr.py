r"""CTX+SimCLR Eps on ILSVRC-2012 (the paper's best configuration), and the
CTX+SimCLR Eps+Aug variant.

Command (records converted by the official Meta-Dataset code):

  ctx-train --config experiments/ctx_simclr.py \
      --config.data.records_root=/path/to/records --workdir runs/ctx_simclr

  # CTX+SimCLR Eps+Aug (stronger augmentation of the ordinary episodes):
  ctx-train --config experiments/ctx_simclr.py:bohb ...

Settings: the official CTX hyperparameters of `common.py` with the changes
of `learn/gin/default/crosstransformer_simclreps_imagenet.gin`: half of the
training episodes are SimCLR episodes (`train/EpisodeDescriptionConfig.
simclr_episode_fraction = 0.5`), 400k steps, learning-rate decay every 4000
steps (other hyperparameters as CTX). SimCLR episodes use the SimCLR v1
augmentation with `color_jitter_strength` 1.0 (the official flag default).
The `bohb` variant adds `md_augmentation="bohb"`: our reading of the paper's
BOHB augmentation, whose exact settings are not in the official code (see
meta_dataset_pipeline/simclr.py); its settings are `config.data.bohb.*`,
e.g. `--config.data.bohb.color_jitter_strength=0.3`.

Hardware: as `ctx_ilsvrc.py` (several accelerators; the episode, up to 500
support + 500 query images at 224x224, is split over all devices), 4x the
steps. The logit width is 500 (a SimCLR episode has up to
`max_support_set_size` classes). Expected result: the CTX+SimCLR Eps row of
the paper's Table 1 (and CTX+SimCLR Eps+Aug for `bohb`, if our reading of
the augmentation is right).

Config arguments: `bohb` (or its alias `aug`) for Eps+Aug, `smoke` for a
tiny run.
"""

from experiments import common
from experiments import ctx_ilsvrc


def get_config(arg: str | None = None):
  """Returns the CTX+SimCLR Eps config; see the module docstring."""
  arg = common.parse_arg(arg, smoke=False, bohb=False, aug=False)
  config = ctx_ilsvrc.get_config("smoke" if arg.smoke else None)
  config.data.train_episode.simclr_episode_fraction = 0.5
  if not arg.smoke:
    config.train.num_steps = 400_000
    config.optimizer.decay_every = 4000
  if arg.bohb or arg.aug:
    config.data.md_augmentation = "bohb"
  return config
