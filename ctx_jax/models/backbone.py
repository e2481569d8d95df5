"""ResNet backbones with episodic batch norm, as the official CTX `resnet34`.

The official backbone (google-research/meta-dataset, `functional_backbones`)
is a ResNet of basic blocks whose first block in *every* stage has a 1x1
projection shortcut, TF `SAME` padding everywhere, no biases, and a stride cap
(`max_stride`): a stage whose stride would push the running stride past the
cap keeps stride 1 and dilates instead. See shared/ALIGNMENT.md.

Batch norm is episodic. In train mode the statistics come from the real
support images only and the query images are normalised with those same
support statistics (with gradient through them). We run support and query
through the network as one concatenated batch and give every row a statistics
weight (1 for a real support image, 0 for padding and for queries), so each
convolution runs once per episode.

Shape letters: N images in the concatenated support+query batch, H and W
spatial height and width, C channels.
"""

from collections.abc import Sequence

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

# Blocks per stage and channels per stage. The stem has the width of the
# first stage, as in the official code (64 for ResNet-18/34).
ARCHITECTURES = {
    'resnet18': ((2, 2, 2, 2), (64, 128, 256, 512)),
    'resnet34': ((3, 4, 6, 3), (64, 128, 256, 512)),
    # A CPU-sized variant built from exactly the same modules.
    'resnet_tiny': ((1, 1, 1, 1), (32, 64, 96, 128)),
}
_STAGE_NAMES = ('conv2_x', 'conv3_x', 'conv4_x', 'conv5_x')
_STAGE_STRIDES = (1, 2, 2, 2)
# Running stride after the stem (stride-2 conv, then stride-2 max-pool).
_STEM_STRIDE = 4


def kernel_init(init: str, key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Initial value of a conv kernel (HWIO) for the given `init` scheme.

  Args:
    init: 'official' (truncated normal, std 0.1, truncated at 2 std, as TF's
      `truncated_normal_initializer` in the official code) or 'he' (truncated
      normal with variance 2 / fan_in).
    key: PRNG key.
    shape: kernel shape [kh, kw, in, out].

  Returns:
    A float32 array of `shape`.
  """
  if init == 'official':
    return 0.1 * jax.random.truncated_normal(key, -2.0, 2.0, shape,
                                             jnp.float32)
  if init == 'he':
    init_fn = nnx.initializers.variance_scaling(
        2.0, 'fan_in', 'truncated_normal', in_axis=(0, 1, 2), out_axis=3)
    return init_fn(key, shape, jnp.float32)
  raise ValueError(f"init must be 'official' or 'he', got {init!r}")


class BatchNorm(nnx.Module):
  """Episodic batch norm: `y = x*s + (offset - mean*s)`.

  Here `s = scale / sqrt(var + eps)`, as in `tf.nn.batch_normalization`.
  Train mode (`use_running_average=False`) takes per-channel statistics over
  the rows with positive weight and updates the EMA in place; eval mode uses
  the EMA statistics for every row.
  """

  def __init__(self, num_channels: int, *, epsilon: float, momentum: float):
    self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
    self.offset = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
    self.mean_ema = nnx.BatchStat(jnp.zeros((num_channels,), jnp.float32))
    self.var_ema = nnx.BatchStat(jnp.ones((num_channels,), jnp.float32))
    self.epsilon = epsilon
    self.momentum = momentum
    self.use_running_average = False

  def __call__(self, x: jax.Array, stat_weight: jax.Array,
               axis_name: str | None = None) -> jax.Array:
    """Normalises x [N,H,W,C]; stat_weight [N] weights rows in the moments.

    Args:
      x: [N,H,W,C] activations (this device's rows under `shard_map`).
      stat_weight: [N] weight of each row in the train-mode moments.
      axis_name: under `shard_map`, the mesh axis the episode is split over:
        the masked sum(x), sum(x^2) and count are then summed over it (the
        official synced batch norm), so every device normalises with, and
        updates its EMA from, the moments of the whole support set. None: the
        sums are over the rows given (under plain `jit` with N sharded, XLA
        makes them global by itself).

    Returns:
      The normalised x, in its dtype.
    """
    # Moments and the affine map in at least float32 (bfloat16 compute).
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.use_running_average:
      mean = self.mean_ema[...].astype(xf.dtype)
      var = self.var_ema[...].astype(xf.dtype)
    else:
      # The official E[x^2] - E[x]^2 form (its synced-BN branch). Plain sums
      # over N: under jit with N sharded, XLA makes them global, which is
      # the official cross-replica (synced) batch norm.
      w = stat_weight.astype(xf.dtype)
      count = jnp.sum(w) * (x.shape[1] * x.shape[2])
      w = w[:, None, None, None]
      sums = (jnp.sum(w * xf, axis=(0, 1, 2)),
              jnp.sum(w * xf * xf, axis=(0, 1, 2)), count)
      if axis_name is not None:
        sums = lax.psum(sums, axis_name)
      sum_x, sum_xx, count = sums
      count = jnp.maximum(count, 1.0)  # An episode with no real support.
      mean = sum_x / count
      var = sum_xx / count - mean * mean
      m = self.momentum
      self.mean_ema[...] = (m * self.mean_ema[...] + (1.0 - m) *
                            lax.stop_gradient(mean).astype(jnp.float32))
      self.var_ema[...] = (m * self.var_ema[...] + (1.0 - m) *
                           lax.stop_gradient(var).astype(jnp.float32))
    scale = self.scale[...].astype(xf.dtype)
    s = scale * lax.rsqrt(var + self.epsilon)
    y = xf * s + (self.offset[...].astype(xf.dtype) - mean * s)
    return y.astype(x.dtype)


class ConvBN(nnx.Module):
  """A bias-free conv (TF `SAME`, optional dilation) followed by BatchNorm."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
               *, stride: int, rate: int, init: str, epsilon: float,
               momentum: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.weight = nnx.Param(kernel_init(init, rngs.params(), shape))
    self.batch_norm = BatchNorm(out_channels, epsilon=epsilon,
                                momentum=momentum)
    self.stride = stride
    self.rate = rate
    self.dtype = dtype

  def __call__(self, x: jax.Array, stat_weight: jax.Array,
               axis_name: str | None = None) -> jax.Array:
    # lax 'SAME' pads with the dilated kernel size, floor(total/2) before,
    # which is TF's rule, so no explicit padding is needed.
    y = lax.conv_general_dilated(
        x.astype(self.dtype), self.weight[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding='SAME',
        rhs_dilation=(self.rate, self.rate),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return self.batch_norm(y, stat_weight, axis_name)


class Shortcut(nnx.Module):
  """Holds the projection of block 0 (TF scope `identity/projection_conv`)."""

  def __init__(self, projection_conv: ConvBN):
    self.projection_conv = projection_conv


class BasicBlock(nnx.Module):
  """`relu(shortcut + BN(conv2(relu(BN(conv1(x))))))`.

  TF calls these `bottleneck_i` although they are basic (two 3x3) blocks.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               input_rate: int, output_rate: int, project: bool, **kwargs):
    self.conv1 = ConvBN(in_channels, out_channels, 3, stride=stride,
                        rate=input_rate, **kwargs)
    self.conv2 = ConvBN(out_channels, out_channels, 3, stride=1,
                        rate=output_rate, **kwargs)
    self.identity = Shortcut(ConvBN(
        in_channels, out_channels, 1, stride=stride, rate=1,
        **kwargs)) if project else None

  def __call__(self, x: jax.Array, stat_weight: jax.Array,
               axis_name: str | None = None) -> jax.Array:
    h = jax.nn.relu(self.conv1(x, stat_weight, axis_name))
    h = self.conv2(h, stat_weight, axis_name)
    if self.identity is not None:
      x = self.identity.projection_conv(x, stat_weight, axis_name)
    return jax.nn.relu(x + h)


class Stage(nnx.Module):
  """One ResNet stage; its blocks are attributes `bottleneck_<i>`, as in TF."""

  def __init__(self, blocks: Sequence[BasicBlock]):
    self.num_blocks = len(blocks)
    for i, block in enumerate(blocks):
      setattr(self, f'bottleneck_{i}', block)

  def __call__(self, x: jax.Array, stat_weight: jax.Array,
               axis_name: str | None = None) -> jax.Array:
    for i in range(self.num_blocks):
      x = getattr(self, f'bottleneck_{i}')(x, stat_weight, axis_name)
    return x


class ResNet(nnx.Module):
  """The official CTX ResNet (keep-spatial-dims output, no input resize).

  Attributes:
    name: the TF scope of the backbone ('resnet34', ...), used by the
      official-checkpoint mapping.
    out_channels: channels of the output feature map.
  """

  def __init__(self, name: str = 'resnet34', *, max_stride: int | None = 16,
               init: str = 'official', bn_epsilon: float = 1e-5,
               bn_ema_momentum: float = 0.9, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if name not in ARCHITECTURES:
      raise ValueError(f'unknown backbone {name!r}; known: '
                       f'{sorted(ARCHITECTURES)}')
    if max_stride is not None and max_stride < _STEM_STRIDE:
      raise ValueError(f'max_stride must be >= {_STEM_STRIDE} (the stem '
                       f'stride) or None, got {max_stride}')
    blocks, widths = ARCHITECTURES[name]
    kwargs = dict(init=init, epsilon=bn_epsilon, momentum=bn_ema_momentum,
                  dtype=dtype, rngs=rngs)
    self.name = name
    self.out_channels = widths[-1]
    self.dtype = dtype
    self.conv1 = ConvBN(3, widths[0], 7, stride=2, rate=1, **kwargs)
    # Dilation rule of the official `_resnet`: a stage whose first block
    # would take the running stride past max_stride keeps stride 1, and its
    # blocks' second convs (and all later convs) use the multiplied rate.
    net_stride, net_rate, in_ch = _STEM_STRIDE, 1, widths[0]
    for stage_name, num, width, stride in zip(_STAGE_NAMES, blocks, widths,
                                              _STAGE_STRIDES):
      input_rate = output_rate = net_rate
      if max_stride is not None and stride * net_stride > max_stride:
        output_rate *= stride
        stride = 1
      stage = [BasicBlock(in_ch, width, stride=stride, input_rate=input_rate,
                          output_rate=output_rate, project=True, **kwargs)]
      stage += [BasicBlock(width, width, stride=1, input_rate=output_rate,
                           output_rate=output_rate, project=False, **kwargs)
                for _ in range(num - 1)]
      setattr(self, stage_name, Stage(stage))
      net_stride, net_rate, in_ch = net_stride * stride, output_rate, width

  def __call__(self, images: jax.Array, stat_weight: jax.Array,
               axis_name: str | None = None) -> jax.Array:
    """Embeds images.

    Args:
      images: [N,H,W,3] pixels in [-1, 1].
      stat_weight: [N] weight of each row in the train-mode BN statistics
        (1 for real support images, 0 for queries and padding).
      axis_name: mesh axis to sync the BN moments over under `shard_map`
        (see `BatchNorm`); None outside it.

    Returns:
      [N,H',W',out_channels] feature maps in the compute dtype.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [N,H,W,3], got {images.shape}')
    if stat_weight.shape != images.shape[:1]:
      raise ValueError(f'stat_weight must be [{images.shape[0]}], got '
                       f'{stat_weight.shape}')
    # The official backbone never back-propagates into its input.
    x = lax.stop_gradient(images).astype(self.dtype)
    x = jax.nn.relu(self.conv1(x, stat_weight, axis_name))
    # Initialising with -inf makes the SAME-padded cells never win, which is
    # what TF's max-pool does.
    x = lax.reduce_window(x, -jnp.inf, lax.max,
                          (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    for stage_name in _STAGE_NAMES:
      x = getattr(self, stage_name)(x, stat_weight, axis_name)
    return x
