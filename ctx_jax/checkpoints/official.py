"""Import of official TF CTX checkpoints, and a per-episode checker.

Our parameter paths mirror the TF variable names: `backbone/<X>` is
`<backbone name>/<X>` (e.g. `resnet34/conv2_x/bottleneck_0/conv1/weight`) and
`head/<X>` is `<X>` (`tformer_keys/weight`). Conv kernels are HWIO in both;
TF stores BN tensors as [1,1,1,C] and we store [C].

The command-line tools built on this (`ctx-import-official`,
`ctx-run-episode`) are in `official_cli.py`.

TensorFlow is imported only inside `read_official_checkpoint`.
"""

from collections.abc import Mapping, Sequence
import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctx_jax.models import learner
from meta_dataset_pipeline import cli

# Names (or name parts) of optimizer and bookkeeping variables: TF1 Adam
# slots and powers, Keras optimizer variables and slots, the step counter.
_OPTIMIZER_PATTERN = re.compile(
    r'(/Adam(_\d+)?$|(^|/)beta[12]_power(_\d+)?$|(^|/)global_step$'
    r'|^(Adam|optimizer|training)/|OPTIMIZER_SLOT|_CHECKPOINTABLE_OBJECT_GRAPH'
    r'|(^|/)(iter|iterations|learning_rate|decay|beta_1|beta_2)$'
    r'|data_dependent_init_done|(^|/)replica_)')


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


def is_optimizer_variable(name: str) -> bool:
  """Whether a checkpoint entry is optimizer or bookkeeping state."""
  return bool(_OPTIMIZER_PATTERN.search(name))


def read_official_checkpoint(prefix: str) -> dict[str, np.ndarray]:
  """Reads the model variables of an official TF checkpoint.

  Args:
    prefix: checkpoint prefix (e.g. `.../model.ckpt`), as for
      `tf.train.load_checkpoint`.

  Returns:
    {TF variable name: array}, without optimizer slots (`/Adam`,
    `/Adam_1`, `beta1_power`, Keras optimizer variables), `global_step`, and
    Keras slot variables `<var>/m`, `<var>/v`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as e:
    raise cli.UserError(
        f'cannot read a TF checkpoint at {prefix} (give the prefix, e.g. '
        f'.../model.ckpt-NNN): {cli.one_line(e)}') from e
  names = set(reader.get_variable_to_shape_map())
  variables = {}
  for name in sorted(names):
    if is_optimizer_variable(name):
      continue
    # Keras optimizers name a variable's moment slots `<var>/m` and `<var>/v`.
    base, _, slot = name.rpartition('/')
    if slot in ('m', 'v', 'vhat') and base in names:
      continue
    variables[name] = np.asarray(reader.get_tensor(name))
  return variables


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
      misshaped.append(f'{name}: checkpoint {list(got)}, model {list(want)}')
  if missing or unexpected or misshaped:
    lines = ['the checkpoint does not match the model '
             f'(backbone {model.backbone.name!r}):']
    lines += [f'  missing in checkpoint: {n}' for n in missing]
    lines += [f'  wrong shape: {m}' for m in misshaped]
    lines += [f'  unexpected (not in the model): {n}' for n in unexpected]
    raise ValueError('\n'.join(lines))
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
  prefixes = {n.split('/', 1)[0] for n in variables if n.startswith('resnet')}
  if len(prefixes) == 1:
    config.backbone = prefixes.pop()
  if 'tformer_keys/weight' in variables and 'tformer_values/weight' in (
      variables):
    config.head = 'ctx'
    config.query_dim = int(np.shape(variables['tformer_keys/weight'])[-1])
    config.val_dim = int(np.shape(variables['tformer_values/weight'])[-1])
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
