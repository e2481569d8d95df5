r"""CTX trained on ILSVRC-2012 with the official hyperparameters (the paper's
"CTX" row).

Command (records converted by the official Meta-Dataset code):

  ctx-train --config experiments/ctx_ilsvrc.py \
      --config.data.records_root=/path/to/records --workdir runs/ctx_ilsvrc

Hardware: the official runs used several accelerators; the episode (up to
500 support + 500 query images at 224x224) is split over all devices.
100k steps. Expected result: the CTX numbers of the paper (Table 1).

Config argument: `smoke` for a tiny run.
"""

from experiments import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, smoke=False)
  config = common.get_base_config()
  config.data.test_sources = common.MD_TEST_SOURCES
  if arg.smoke:
    common.apply_smoke(config)
  return config
