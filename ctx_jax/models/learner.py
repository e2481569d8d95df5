"""Model assembly: config, the episodic model (backbone + head), weight decay.

The model embeds support and query images in one backbone pass with
episodic batch norm (see backbone.py), then a head turns the embeddings into
per-class logits. It follows the official `CrossTransformerLearner` with
`transductive_batch_norm=False`, `backprop_through_moments=True` and
`bn.use_ema=True` (shared/ALIGNMENT.md).

Shape letters: S support images, Q query images, W ways, H and X image height
and width, E embedding channels.
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from ctx_jax.models import backbone as backbone_lib
from ctx_jax.models import crosstransformer
from ctx_jax.models import protonet

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float64': jnp.float64}


def default_model_config() -> ml_collections.ConfigDict:
  """The official CTX model (ResNet-34, stride 16, CTX head 128/128).

  Everything follows the official configuration except `init` (see below).

  Fields:
    backbone: 'resnet34', 'resnet18' or 'resnet_tiny' (CPU demos: one block
      per stage, widths 32/64/96/128).
    max_stride: output-stride cap; stages that would exceed it dilate
      instead of striding. 0 means no cap.
    head: 'ctx' (CrossTransformer) or 'protonet'.
    query_dim, val_dim: CTX key/query and value channels.
    bn_ema_momentum: m in `ema = m*ema + (1-m)*batch_stat` (official 0.9).
    bn_epsilon: batch-norm epsilon (official 1e-5).
    protonet_distance: 'euclidean' or 'cosine' (ProtoNet head only).
    query_chunk_size: queries per rematerialised chunk of the CTX head; its
      memory is linear in this (forward+backward in float32 with 500 support
      images of 14x14 features: about 2.9 GiB at 8, see
      benchmarks/ctx_head_bench.py).
    dtype: compute dtype, 'float32' or 'bfloat16' ('float64' needs
      jax_enable_x64 and is for reference checks only). Parameters and BN
      statistics stay float32; logits are float32.
    init: conv kernel init, 'he' (truncated normal, variance 2/fan_in; the
      default) or 'official' (truncated normal, std 0.1, as the TF code).
      Every backbone conv is followed by batch norm, so the kernel scale
      mostly sets Adam's relative step size (std 0.1 is ~5x He for the
      3x3x512 convs, i.e. ~5x smaller relative steps), while the unnormalised
      CTX projections start less saturated with He. On the resnet_tiny glyph
      demo (experiments/demo.py, 800 steps, 2 seeds, 200 test episodes) He
      reached 93.2% and 90.3% test accuracy versus 91.0% and 90.0% with the
      official init, so He is the default for from-scratch training; use
      'official' to follow the official recipe exactly. Imported checkpoints
      do not depend on it.
  """
  config = ml_collections.ConfigDict()
  config.backbone = 'resnet34'
  config.max_stride = 16
  config.head = 'ctx'
  config.query_dim = 128
  config.val_dim = 128
  config.bn_ema_momentum = 0.9
  config.bn_epsilon = 1e-5
  config.protonet_distance = 'euclidean'
  config.query_chunk_size = 8
  config.dtype = 'float32'
  config.init = 'he'
  return config


class EpisodicModel(nnx.Module):
  """Backbone + head; `model.train()` / `model.eval()` pick the BN mode."""

  def __init__(self, backbone: backbone_lib.ResNet, head: nnx.Module):
    self.backbone = backbone
    self.head = head

  def embed(self, support_images: jax.Array, support_mask: jax.Array,
            query_images: jax.Array, axis_name: str | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Backbone feature maps of the support and query sets.

    Args:
      support_images: [S,H,X,3] in [-1, 1].
      support_mask: [S] bool, False for padded rows.
      query_images: [Q,H,X,3].
      axis_name: under `shard_map`, the mesh axis the episode is split over
        (the arguments are then this device's rows); the batch-norm moments
        are synced over it. None: no collectives.

    Returns:
      ([S,h,x,E], [Q,h,x,E]) in the compute dtype.
    """
    if support_images.ndim != 4 or query_images.ndim != 4 or (
        support_images.shape[1:] != query_images.shape[1:]):
      raise ValueError('support and query images must be [N,H,X,3] of one '
                       f'size; got {support_images.shape} and '
                       f'{query_images.shape}')
    if support_mask.shape != support_images.shape[:1]:
      raise ValueError(f'support_mask must be [{support_images.shape[0]}], '
                       f'got {support_mask.shape}')
    num_support = support_images.shape[0]
    # Only real support rows enter the BN statistics; queries are then
    # normalised with the support moments (non-transductive BN).
    stat_weight = jnp.concatenate([
        support_mask.astype(jnp.float32),
        jnp.zeros(query_images.shape[:1], jnp.float32)])
    images = jnp.concatenate([support_images, query_images], axis=0)
    features = self.backbone(images, stat_weight, axis_name)
    return features[:num_support], features[num_support:]

  def __call__(self, support_images: jax.Array, support_labels: jax.Array,
               support_mask: jax.Array, query_images: jax.Array,
               num_ways: int, axis_name: str | None = None) -> jax.Array:
    """Query logits of an episode.

    Args:
      support_images: [S,H,X,3] in [-1, 1].
      support_labels: [S] int32 in [0, num_ways).
      support_mask: [S] bool, False for padded rows.
      query_images: [Q,H,X,3].
      num_ways: static number of logit columns W (may exceed the number of
        classes present; absent classes get ABSENT_CLASS_LOGIT).
      axis_name: under `shard_map`, the mesh axis the episode is split over:
        each device passes its own contiguous chunk of support and query
        rows, batch-norm moments are synced and the head sees the whole
        support set (all-gathered), while queries stay local. None: no
        collectives (a single device, or GSPMD under plain `jit`).

    Returns:
      [Q,W] float32 logits (of this device's queries under `shard_map`).
    """
    if not isinstance(num_ways, int) or num_ways < 1:
      raise ValueError(f'num_ways must be a positive int, got {num_ways!r}')
    # Static checks at the model's boundary (free under jit: shapes only).
    chex.assert_rank([support_images, query_images], 4)
    chex.assert_rank([support_labels, support_mask], 1)
    chex.assert_equal_shape_prefix(
        [support_images, support_labels, support_mask], 1)
    chex.assert_equal_shape_suffix([support_images, query_images], 3)
    chex.assert_type([support_labels, support_mask], [int, bool])
    support_emb, query_emb = self.embed(support_images, support_mask,
                                        query_images, axis_name)
    return self.head(support_emb, support_labels, support_mask, query_emb,
                     num_ways=num_ways, axis_name=axis_name)


def build_model(config: ml_collections.ConfigDict, *,
                rngs: nnx.Rngs) -> EpisodicModel:
  """Builds the model described by `config` (see default_model_config)."""
  if config.dtype not in _DTYPES:
    raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got '
                     f'{config.dtype!r}')
  if config.head not in ('ctx', 'protonet'):
    raise ValueError(f"head must be 'ctx' or 'protonet', got {config.head!r}")
  dtype = _DTYPES[config.dtype]
  resnet = backbone_lib.ResNet(
      config.backbone, max_stride=config.max_stride or None,
      init=config.init, bn_epsilon=config.bn_epsilon,
      bn_ema_momentum=config.bn_ema_momentum, dtype=dtype, rngs=rngs)
  if config.head == 'ctx':
    head = crosstransformer.CrossTransformerHead(
        resnet.out_channels, query_dim=config.query_dim,
        val_dim=config.val_dim, query_chunk_size=config.query_chunk_size,
        init=config.init, dtype=dtype, rngs=rngs)
  else:
    head = protonet.ProtoNetHead(config.protonet_distance)
  return EpisodicModel(resnet, head)


def weight_decay_sum(model: nnx.Module) -> jax.Array:
  """Sum over all conv kernels (backbone and CTX projections) of sum(w**2).

  Batch-norm parameters are not included, as in the official regulariser
  (a Keras L2 regulariser on each kernel, without a factor 1/2). The caller
  multiplies by the weight decay.
  """
  total = jnp.zeros((), jnp.float32)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == 'weight':
      total += jnp.sum(jnp.square(variable[...].astype(jnp.float32)))
  return total
