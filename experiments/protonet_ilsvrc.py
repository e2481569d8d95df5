r"""The paper's ProtoNet baseline: ResNet-34 (stride 16, 224x224) with a
prototypical head, trained on ILSVRC-2012 exactly as CTX is.

Command (records converted by the official Meta-Dataset code):

  ctx-train --config experiments/protonet_ilsvrc.py \
      --config.data.records_root=/path/to/records --workdir runs/protonet

The CTX paper compares against "ProtoNets, our implementation" with the same
backbone, image size, episodes and optimiser as CTX; only the head differs
(squared Euclidean distances to class-mean prototypes of the pooled
embeddings). The official repository has no gin file for this row, so this
config is the CTX one (`experiments/ctx_ilsvrc.py`) with `model.head =
"protonet"`. Hardware and runtime as for CTX (100k steps, the episode split
over all devices). Expected result: the paper's ProtoNet (ResNet-34) row.

Config argument: `smoke` for a tiny run.
"""

from experiments import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, smoke=False)
  config = common.get_base_config()
  config.model.head = "protonet"
  config.data.test_sources = common.MD_TEST_SOURCES
  if arg.smoke:
    common.apply_smoke(config)
  return config
