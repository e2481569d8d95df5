"""Import of official TF CTX checkpoints, and a per-episode checker.

Our parameter paths mirror the TF variable names: `backbone/<X>` is
`<backbone name>/<X>` (e.g. `resnet34/conv2_x/bottleneck_0/conv1/weight`) and
`head/<X>` is `<X>` (`tformer_keys/weight`). Conv kernels are HWIO in both;
TF stores BN tensors as [1,1,1,C] and we store [C].

The command-line tools built on this (`ctx-import-official`,
`ctx-run-episode`) are in `official_cli.py`.

TensorFlow is imported only inside `read_official_checkpoint_and_ignored`.
"""

from collections.abc import Collection, Mapping, Sequence
import posixpath
import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctx_jax.models import learner
from meta_dataset_pipeline import cli

# Checkpoint entries that are not model weights, by kind. Each rule is a
# name written by the official trainer or by standard TF / Keras tools;
# any other entry the model lacks stops the import. The first match wins.
OPTIMIZER = 'optimizer state'
GLOBAL_STEP = 'global step'
HEAD = 'classifier head'
EMA = 'EMA shadow variables'
DISTRIBUTED = 'distribution-strategy copies'
METADATA = 'checkpoint metadata'
IGNORED_KINDS = (OPTIMIZER, GLOBAL_STEP, HEAD, EMA, DISTRIBUTED, METADATA)
_IGNORE_RULES = (
    # tf.distribute.MirroredStrategy names a variable's per-device copies
    # `<var>/replica_<i>`; the official trainer leaves every name containing
    # `replica_` out of its Saver, as copies of optimizer variables.
    (DISTRIBUTED, re.compile(r'(^|/)replica_\d')),
    # tf.train.ExponentialMovingAverage keeps `<var>/ExponentialMovingAverage`
    # (plus `/biased`, `/local_step` when zero-debiased). The model's own BN
    # statistics are `batch_norm/mean_ema|var_ema` and are not matched.
    (EMA, re.compile(r'/ExponentialMovingAverage(_\d+)?(/|$)')),
    # TF1 Adam slots and powers (`<var>/Adam`, `<var>/Adam_1`,
    # `beta1_power`), Keras optimizer variables (`Adam/iter`, `training/...`,
    # object-based `optimizer/...`).
    (OPTIMIZER, re.compile(
        r'/Adam(_\d+)?$|(^|/)beta[12]_power(_\d+)?$'
        r'|^(Adam|optimizer|training)/|OPTIMIZER_SLOT'
        r'|(^|/)(iter|iterations|learning_rate|decay|beta_1|beta_2)$')),
    (GLOBAL_STEP, re.compile(r'(^|/)global_step$')),
    # The linear classifier of the official Baseline learner (scope `fc`:
    # `weight`, `bias`, or with weight norm `w_fc`, `g`, `b_fc`,
    # `data_dependent_init_done`; `cosine_scale`) and of BaselineFinetune
    # (`fc_finetune`). ResNet backbones trained that way import without it.
    (HEAD, re.compile(r'^fc(_finetune)?/|(^|/)data_dependent_init_done$')),
    # Object-based checkpoints (tf.train.Checkpoint) store their object graph.
    (METADATA, re.compile(r'^_CHECKPOINTABLE_OBJECT_GRAPH$')),
)
# Keras optimizers name a variable's moment slots `<var>/m`, `<var>/v`.
_KERAS_SLOTS = ('m', 'v', 'vhat')


def _tf_name(path: Sequence[str], backbone_name: str) -> str:
  """TF variable name of the model variable at `path`."""
  if path[0] == 'backbone':
    return '/'.join((backbone_name,) + tuple(path[1:]))
  if path[0] == 'head':
    return '/'.join(path[1:])
  raise ValueError(f'unexpected model variable path {path}')


def _tf_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
  """TF shape of a model variable: BN tensors are [1,1,1,C] in TF."""
  if len(path) >= 2 and path[-2] == 'batch_norm':
    return (1, 1, 1) + tuple(shape)
  return tuple(shape)


def _named_variables(state: nnx.State, backbone_name: str):
  """{TF name: (path, Variable)} for every variable in `state`."""
  named = {}
  for path, variable in nnx.to_flat_state(state):
    path = tuple(str(p) for p in path)
    named[_tf_name(path, backbone_name)] = (path, variable)
  return named


def official_shapes(model: learner.EpisodicModel
                    ) -> dict[str, tuple[int, ...]]:
  """{TF name: TF shape} of the model's variables (also for abstract models)."""
  named = _named_variables(nnx.state(model), model.backbone.name)
  return {name: _tf_shape(path, var.get_value().shape)
          for name, (path, var) in named.items()}


def official_variables(model: learner.EpisodicModel) -> dict[str, np.ndarray]:
  """The model's parameters and EMA statistics as TF-named float32 arrays."""
  named = _named_variables(nnx.state(model), model.backbone.name)
  return {name: np.asarray(var[...], np.float32).reshape(
      _tf_shape(path, var[...].shape)) for name, (path, var) in named.items()}


def ignored_kind(name: str, names: Collection[str] = ()) -> str | None:
  """The kind (one of `IGNORED_KINDS`) of a non-model checkpoint entry.

  Args:
    name: a checkpoint entry.
    names: all entries of the checkpoint (to recognise Keras slots
      `<var>/m` only next to `<var>`).

  Returns:
    The kind, or None for a name that may be a model variable.
  """
  for kind, pattern in _IGNORE_RULES:
    if pattern.search(name):
      return kind
  base, _, slot = name.rpartition('/')
  if slot in _KERAS_SLOTS and base in names:
    return OPTIMIZER
  return None


def read_official_checkpoint_and_ignored(prefix: str
                                         ) -> tuple[dict[str, np.ndarray],
                                                    dict[str, list[str]]]:
  """Reads an official TF checkpoint's candidate model variables.

  Args:
    prefix: checkpoint prefix (e.g. `.../model_10000.ckpt`), as for
      `tf.train.load_checkpoint`.

  Returns:
    `(variables, ignored)`: {TF name: array} of every entry not ignored, and
    {kind: sorted names} of the entries left out (see `ignored_kind`).

  Raises:
    cli.UserError: no checkpoint can be read at `prefix` (naming the
      checkpoints found beside it, if any).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    found = _checkpoints_near(tf, prefix)
    hint = f'; checkpoints there: {", ".join(found)}' if found else ''
    raise cli.UserError(
        f'cannot read a TF checkpoint at {prefix} (give the prefix, e.g. '
        f'.../model.ckpt-NNN{hint}): {cli.one_line(e)}') from e
  names = set(reader.get_variable_to_shape_map())
  variables, ignored = {}, {}
  for name in sorted(names):
    kind = ignored_kind(name, names)
    if kind is None:
      variables[name] = np.asarray(reader.get_tensor(name))
    else:
      ignored.setdefault(kind, []).append(name)
  return variables, ignored


def read_official_checkpoint(prefix: str) -> dict[str, np.ndarray]:
  """`read_official_checkpoint_and_ignored` without the ignored list."""
  return read_official_checkpoint_and_ignored(prefix)[0]


def _checkpoints_near(tf, prefix: str, limit: int = 3) -> list[str]:
  """Up to `limit` checkpoint prefixes in, beside or starting with `prefix`."""
  prefix = str(prefix).rstrip('/')
  found = []
  for pattern in (prefix + '/*.index', prefix + '*.index',
                  posixpath.join(posixpath.dirname(prefix) or '.', '*.index')):
    try:
      matches = tf.io.gfile.glob(pattern)
    except tf.errors.OpError:  # An unreadable folder: no hint from it.
      continue
    found += [m[:-len('.index')] for m in sorted(matches)
              if m[:-len('.index')] not in found]
  return found[:limit]


def describe_ignored(ignored: Mapping[str, Sequence[str]],
                     examples: int = 2) -> list[str]:
  """Lines for a user: ignored entries per kind, with counts and examples."""
  total = sum(len(v) for v in ignored.values())
  if not total:
    return []
  entries = 'entry' if total == 1 else 'entries'
  lines = [f'ignored {total} checkpoint {entries} that are not model '
           'weights:']
  for kind in IGNORED_KINDS:
    names = ignored.get(kind, ())
    if names:
      shown = ', '.join(names[:examples])
      more = ', ...' if len(names) > examples else ''
      lines.append(f'  {kind}: {len(names)} ({shown}{more})')
  return lines


def _name_some(items: Sequence[str], limit: int = 5) -> str:
  """`a, b, c and 12 more`: a long list kept to one readable line."""
  shown = ', '.join(items[:limit])
  return shown + (f' and {len(items) - limit} more' if len(items) > limit
                  else '')


def assign_official_weights(model: learner.EpisodicModel,
                            variables: Mapping[str, np.ndarray]) -> None:
  """Sets every parameter and EMA statistic of `model` from TF variables.

  Args:
    model: a model whose architecture matches the checkpoint.
    variables: {TF name: array}, e.g. from `read_official_checkpoint`.

  Raises:
    ValueError: naming every model variable missing from `variables`, every
      shape mismatch, and every checkpoint variable the model lacks. Nothing
      is assigned in that case.
  """
  named = _named_variables(nnx.state(model), model.backbone.name)
  missing = sorted(set(named) - set(variables))
  unexpected = sorted(set(variables) - set(named))
  misshaped = []
  for name in sorted(set(named) & set(variables)):
    path, var = named[name]
    want = _tf_shape(path, var.get_value().shape)
    got = tuple(np.shape(variables[name]))
    if got != want:
      misshaped.append(f'{name} (checkpoint {list(got)}, model '
                       f'{list(want)})')
  if missing or unexpected or misshaped:
    parts = []
    if missing:
      parts.append(f'missing in checkpoint: {_name_some(missing)}')
    if misshaped:
      parts.append(f'wrong shape: {_name_some(misshaped)}')
    if unexpected:
      parts.append(f'unexpected (not in the model): {_name_some(unexpected)}')
    raise ValueError('the checkpoint does not match the model (backbone '
                     f'{model.backbone.name!r}): ' + '; '.join(parts))
  for name, (_, var) in named.items():
    # get_value/set_value also work on an abstract model (nnx.eval_shape),
    # which skips the cost of random initialisation.
    current = var.get_value()
    value = np.asarray(variables[name]).reshape(current.shape)
    var.set_value(jnp.asarray(value, current.dtype))


def build_official_model(variables: Mapping[str, np.ndarray], **overrides
                         ) -> tuple[learner.EpisodicModel,
                                    ml_collections.ConfigDict]:
  """Builds a model from checkpoint variables, without random init.

  Args:
    variables: {TF name: array}, e.g. from `read_official_checkpoint`.
    **overrides: model config fields (None values are ignored), e.g.
      `max_stride`, which checkpoints do not record.

  Returns:
    `(model, model_config)`.
  """
  config = config_from_variables(variables, **overrides)
  model = nnx.eval_shape(
      lambda: learner.build_model(config, rngs=nnx.Rngs(0)))
  assign_official_weights(model, variables)
  return model, config


def config_from_variables(variables: Mapping[str, np.ndarray],
                          **overrides) -> ml_collections.ConfigDict:
  """A model config matching checkpoint variables (backbone, CTX dims)."""
  config = learner.default_model_config()
  prefixes = sorted({n.split('/', 1)[0] for n in variables
                     if n.startswith('resnet')})
  if overrides.get('backbone') is None:
    if not prefixes:
      raise ValueError(
          'no ResNet backbone variables (resnet<N>/...) in the checkpoint; '
          f'its model variables: {_name_some(sorted(variables)) or "none"}')
    if len(prefixes) > 1:
      raise ValueError('variables of several backbones in the checkpoint '
                       f'({", ".join(prefixes)}): choose one with --backbone')
    config.backbone = prefixes[0]
  # Either CTX projection makes it a CTX checkpoint, so that a missing one
  # is reported by name rather than the other as unexpected.
  keys = variables.get('tformer_keys/weight')
  values = variables.get('tformer_values/weight')
  if keys is not None or values is not None:
    config.head = 'ctx'
    if keys is not None:
      config.query_dim = int(np.shape(keys)[-1])
    if values is not None:
      config.val_dim = int(np.shape(values)[-1])
  else:
    config.head = 'protonet'
  for key, value in overrides.items():
    if value is not None:
      config[key] = value
  return config


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over queries (the fixture's loss)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return -jnp.mean(picked)


@nnx.jit(static_argnames='num_ways')
def _eval_outputs(model, support, labels, mask, query, query_labels,
                  num_ways):
  """Eval-mode logits, loss and embeddings."""
  support_emb, query_emb = model.embed(support, mask, query)
  logits = model.head(support_emb, labels, mask, query_emb, num_ways=num_ways)
  return logits, _cross_entropy(logits, query_labels), support_emb, query_emb


@nnx.jit(static_argnames='num_ways')
def _train_outputs(model, support, labels, mask, query, query_labels,
                   num_ways):
  """Train-mode logits, loss, embeddings and parameter gradients."""

  def loss_fn(model):
    support_emb, query_emb = model.embed(support, mask, query)
    logits = model.head(support_emb, labels, mask, query_emb,
                        num_ways=num_ways)
    loss = _cross_entropy(logits, query_labels)
    return loss, (logits, support_emb, query_emb)

  (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return (aux[0], loss, aux[1], aux[2]), grads


def episode_outputs(model: learner.EpisodicModel,
                    episode: Mapping[str, np.ndarray],
                    gradient_names: Sequence[str] | None = None
                    ) -> dict[str, np.ndarray]:
  """The fixture's quantities for one (unpadded) episode.

  Runs eval mode first and then train mode on a copy of `model`, so neither
  the caller's model nor the eval outputs see a train-mode EMA update.

  Args:
    model: the model.
    episode: `support_images`, `support_labels`, `query_images`,
      `query_labels` (the keys of the fixture's `episode.npz`).
    gradient_names: TF names of the parameters whose gradients to return;
      default all.

  Returns:
    {`logits_train`, `loss_train`, `support_emb_train`, `query_emb_train`,
    the same with `_eval`, one gradient per TF name with '/' -> '__',
    `gradient_keys`}, as numpy arrays in TF shapes.
  """
  model = nnx.clone(model)
  support = jnp.asarray(episode['support_images'])
  labels = jnp.asarray(episode['support_labels'], jnp.int32)
  query = jnp.asarray(episode['query_images'])
  query_labels = jnp.asarray(episode['query_labels'], jnp.int32)
  mask = jnp.ones(labels.shape, bool)
  # The official logits have max(support label) + 1 columns.
  num_ways = int(np.max(episode['support_labels'])) + 1
  args = (support, labels, mask, query, query_labels)
  out = {}
  model.eval()
  for key, value in zip(('logits', 'loss', 'support_emb', 'query_emb'),
                        _eval_outputs(model, *args, num_ways=num_ways)):
    out[f'{key}_eval'] = np.asarray(value)
  model.train()
  values, grads = _train_outputs(model, *args, num_ways=num_ways)
  for key, value in zip(('logits', 'loss', 'support_emb', 'query_emb'),
                        values):
    out[f'{key}_train'] = np.asarray(value)
  named = _named_variables(grads, model.backbone.name)
  if gradient_names is None:
    gradient_names = sorted(named)
  unknown = sorted(set(gradient_names) - set(named))
  if unknown:
    raise ValueError(f'no trainable parameter named {unknown}')
  keys = []
  for name in gradient_names:
    path, var = named[name]
    key = name.replace('/', '__')
    out[key] = np.asarray(var[...]).reshape(_tf_shape(path, var[...].shape))
    keys.append(key)
  out['gradient_keys'] = np.array(keys)
  return out
