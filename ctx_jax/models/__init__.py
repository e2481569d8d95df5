"""CTX models: ResNet backbones, CrossTransformer and ProtoNet heads.

Typical use::

  from ctx_jax import models
  model = models.build_model(models.default_model_config(),
                             rngs=nnx.Rngs(0))
  model.train()
  logits = model(support_images, support_labels, support_mask,
                 query_images, num_ways=5)
"""

from ctx_jax.models.backbone import ARCHITECTURES
from ctx_jax.models.backbone import BatchNorm
from ctx_jax.models.backbone import ResNet
from ctx_jax.models.crosstransformer import ABSENT_CLASS_LOGIT
from ctx_jax.models.crosstransformer import crosstransformer_logits
from ctx_jax.models.crosstransformer import crosstransformer_logits_naive
from ctx_jax.models.crosstransformer import crosstransformer_attention
from ctx_jax.models.crosstransformer import CrossTransformerHead
from ctx_jax.models.inspection import inspect_episode
from ctx_jax.models.inspection import Inspection
from ctx_jax.models.learner import build_model
from ctx_jax.models.learner import default_model_config
from ctx_jax.models.learner import EpisodicModel
from ctx_jax.models.learner import weight_decay_sum
from ctx_jax.models.protonet import protonet_logits
from ctx_jax.models.protonet import ProtoNetHead
