"""Tests of the official-checkpoint import and the two console mains."""

import json

from flax import nnx
import numpy as np
import pytest
import tensorflow as tf

from ctx_jax import models
from ctx_jax.checkpoints import export
from ctx_jax.checkpoints import official as official_import
from ctx_jax.checkpoints import official_cli
from tests.models_test import make_episode
from tests.models_test import random_model
from tests.models_test import tiny_config


def write_tf_checkpoint(prefix, variables):
  """Writes a TF (V2-format) checkpoint holding exactly `variables`."""
  names = sorted(variables)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                    shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(variables[n]) for n in names])


def with_optimizer_state(variables):
  """Adds TF1-Adam, Keras-Adam and bookkeeping entries to `variables`."""
  out = dict(variables)
  for name, value in list(variables.items())[:5]:
    out[f'{name}/Adam'] = np.zeros_like(value)
    out[f'{name}/Adam_1'] = np.ones_like(value)
    out[f'{name}/m'] = np.zeros_like(value)
    out[f'{name}/v'] = np.ones_like(value)
  out['beta1_power'] = np.float32(0.9)
  out['beta2_power'] = np.float32(0.999)
  out['global_step'] = np.int64(7)
  out['Adam/iter'] = np.int64(7)
  out['Adam/learning_rate'] = np.float32(6e-4)
  return out


@pytest.fixture(scope='module')
def tiny_variables():
  return official_import.official_variables(random_model(tiny_config(), 3))


def test_names_and_shapes_match_the_official_checkpoint(shared_dir):
  listing = shared_dir / 'fixtures' / 'official_ctx' / 'variables.txt'
  official = {}
  for line in listing.read_text().splitlines():
    name, shape, _ = line.split('\t')
    if name != 'global_step':
      official[name] = tuple(int(d) for d in shape.strip('[]').split(',') if d)
  model = nnx.eval_shape(lambda: models.build_model(
      models.default_model_config(), rngs=nnx.Rngs(0)))
  assert official_import.official_shapes(model) == official
  assert len(official) == 187


def test_ignored_kinds_of_checkpoint_entries():
  kinds = {
      'resnet34/conv1/weight/Adam': official_import.OPTIMIZER,
      'tformer_keys/weight/Adam_1': official_import.OPTIMIZER,
      'beta1_power': official_import.OPTIMIZER,
      'beta2_power_1': official_import.OPTIMIZER,
      'Adam/iter': official_import.OPTIMIZER,
      'training/Adam/decay': official_import.OPTIMIZER,
      'optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE': official_import.OPTIMIZER,
      'resnet34/conv1/weight/m': official_import.OPTIMIZER,
      'global_step': official_import.GLOBAL_STEP,
      'fc/weight': official_import.HEAD,
      'fc/w_fc': official_import.HEAD,
      'fc/data_dependent_init_done': official_import.HEAD,
      'fc_finetune/bias': official_import.HEAD,
      'resnet34/conv1/weight/ExponentialMovingAverage': official_import.EMA,
      't/ExponentialMovingAverage/local_step': official_import.EMA,
      'resnet34/conv1/weight/replica_1': official_import.DISTRIBUTED,
      '_CHECKPOINTABLE_OBJECT_GRAPH': official_import.METADATA,
  }
  names = {'resnet34/conv1/weight'}
  for name, kind in kinds.items():
    assert official_import.ignored_kind(name, names) == kind, name
  # Model variables, and names no rule justifies, are kept (an unknown one
  # then stops the import as not in the model).
  for name in ['resnet34/conv1/weight', 'tformer_values/weight',
               'resnet34/conv2_x/bottleneck_0/conv1/batch_norm/var_ema',
               'resnet34/conv2_x/bottleneck_0/conv1/batch_norm/mean_ema',
               'fully_connected/layer_0/weight', 'logits/weight',
               'fcx/weight', 'resnet34/fc/weight', 'other/m']:
    assert official_import.ignored_kind(name, names) is None, name


def test_read_checkpoint_skips_optimizer_state(tmp_path, tiny_variables):
  prefix = tmp_path / 'model.ckpt'
  write_tf_checkpoint(prefix, with_optimizer_state(tiny_variables))
  read = official_import.read_official_checkpoint(str(prefix))
  assert sorted(read) == sorted(tiny_variables)
  for name, value in tiny_variables.items():
    np.testing.assert_array_equal(read[name], value)


def test_assign_round_trip(tiny_variables):
  model, config = official_import.build_official_model(tiny_variables,
                                                       max_stride=8)
  assert (config.backbone, config.head, config.query_dim) == ('resnet_tiny',
                                                              'ctx', 16)
  back = official_import.official_variables(model)
  assert sorted(back) == sorted(tiny_variables)
  for name, value in tiny_variables.items():
    np.testing.assert_array_equal(back[name], value)


def test_assign_reports_missing_misshaped_and_unexpected(tiny_variables):
  model = random_model(tiny_config(), 4)
  before = official_import.official_variables(model)
  broken = dict(tiny_variables)
  del broken['resnet_tiny/conv3_x/bottleneck_0/conv2/weight']
  del broken['tformer_values/weight']
  broken['resnet_tiny/conv1/batch_norm/scale'] = np.ones((32,), np.float32)
  broken['tformer_keys/weight'] = np.ones((1, 1, 128, 8), np.float32)
  broken['resnet_tiny/fc/weight'] = np.ones((128, 10), np.float32)
  with pytest.raises(ValueError) as info:
    official_import.assign_official_weights(model, broken)
  message = str(info.value)
  for part in ['missing in checkpoint: resnet_tiny/conv3_x/bottleneck_0/'
               'conv2/weight, tformer_values/weight;',
               'wrong shape: resnet_tiny/conv1/batch_norm/scale (checkpoint '
               '[32], model [1, 1, 1, 32]), tformer_keys/weight (checkpoint '
               '[1, 1, 128, 8], model [1, 1, 128, 16]);',
               'unexpected (not in the model): resnet_tiny/fc/weight']:
    assert part in message, message
  # Nothing was assigned.
  after = official_import.official_variables(model)
  for name, value in before.items():
    np.testing.assert_array_equal(after[name], value)
  # A ResNet-18 checkpoint does not fit a ResNet-34 model.
  resnet34 = nnx.eval_shape(lambda: models.build_model(
      models.default_model_config(), rngs=nnx.Rngs(0)))
  resnet18 = nnx.eval_shape(lambda: models.build_model(
      tiny_config(backbone='resnet18', query_dim=128, val_dim=128),
      rngs=nnx.Rngs(0)))
  fake18 = {n: np.zeros(s, np.float32) for n, s in
            official_import.official_shapes(resnet18).items()}
  with pytest.raises(ValueError, match='missing in checkpoint: resnet34/'):
    official_import.assign_official_weights(resnet34, fake18)


def test_console_mains_round_trip(tmp_path, tiny_variables):
  prefix = tmp_path / 'ckpt' / 'model.ckpt'
  prefix.parent.mkdir()
  write_tf_checkpoint(prefix, with_optimizer_state(tiny_variables))
  outdir = tmp_path / 'export'
  official_cli.run([str(prefix), str(outdir), '--max_stride', '8',
                       '--query_chunk_size', '4'])
  model, config = export.load_exported_model(outdir)
  assert (config.backbone, config.max_stride) == ('resnet_tiny', 8)
  back = official_import.official_variables(model)
  for name, value in tiny_variables.items():
    np.testing.assert_array_equal(back[name], value)

  episode = make_episode(5, [2, 0, 1, 0, 2, 1], 4)
  del episode['support_mask']
  np.savez(tmp_path / 'episode.npz', **episode)
  output = tmp_path / 'out.npz'
  official_cli.run_episode_main([
      '--model_dir', str(outdir), '--episode', str(tmp_path / 'episode.npz'),
      '--output', str(output)])
  with np.load(output) as out:
    out = dict(out)
  forward_keys = {f'{q}_{m}' for q in ('logits', 'loss', 'support_emb',
                                       'query_emb') for m in ('train', 'eval')}
  gradient_keys = {n.replace('/', '__') for n in tiny_variables
                   if not n.endswith('_ema')}
  assert set(out) == forward_keys | gradient_keys | {'gradient_keys'}
  assert set(out['gradient_keys']) == gradient_keys
  assert out['logits_train'].shape == (4, 3)
  assert out['support_emb_eval'].shape == (6, 6, 6, 128)
  assert out['resnet_tiny__conv1__batch_norm__scale'].shape == (1, 1, 1, 32)
  # The eval outputs come from the unchanged EMA statistics.
  direct = official_import.episode_outputs(model, episode)
  np.testing.assert_allclose(out['logits_eval'], direct['logits_eval'],
                             rtol=1e-6)
  np.testing.assert_allclose(out['loss_train'], direct['loss_train'],
                             rtol=1e-6)


def write_checkpoint_with_extras(prefix, variables):
  """A tf.compat.v1 Saver checkpoint of `variables` plus non-model entries.

  The optimizer slots, step, EMA shadows and Baseline `fc` head are made by
  the TF APIs that make them in real runs; the Keras slots and the
  MirroredStrategy copy (`<var>/replica_1`, the name MirroredStrategy gives
  a variable's second-device copy) are plain variables with those names.
  Nothing is trained, so the model variables keep their values.

  Returns:
    {kind: number of extra entries of that kind}.
  """
  v1 = tf.compat.v1
  with tf.Graph().as_default():
    model_vars = [v1.get_variable(name, initializer=tf.constant(value))
                  for name, value in sorted(variables.items())]
    with v1.variable_scope('fc'):  # The official Baseline learner's head.
      head = [v1.get_variable('weight', initializer=tf.ones([128, 10])),
              v1.get_variable('bias', initializer=tf.zeros([10]))]
    step = v1.train.get_or_create_global_step()
    kernels = [v for v in model_vars if v.op.name.endswith('/weight')]
    trained = kernels[:2] + head
    loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in trained])
    v1.train.AdamOptimizer(1e-3).minimize(loss, global_step=step,
                                          var_list=trained)
    v1.train.ExponentialMovingAverage(0.99).apply(kernels[:3])
    first = kernels[0]
    for suffix in ('m', 'v', 'replica_1'):
      v1.get_variable(f'{first.op.name}/{suffix}',
                      initializer=tf.zeros_like(first.initial_value))
    v1.get_variable('Adam/iter', initializer=tf.constant(7, tf.int64))
    saver = v1.train.Saver()
    with v1.Session() as session:
      session.run(v1.global_variables_initializer())
      saver.save(session, str(prefix), write_meta_graph=False)
  # Adam: 2 slots for each of 4 variables, 2 powers, 2 Keras slots, iter.
  return {official_import.OPTIMIZER: 13, official_import.GLOBAL_STEP: 1,
          official_import.HEAD: 2, official_import.EMA: 3,
          official_import.DISTRIBUTED: 1}


def test_import_ignores_extras_and_lists_them(tmp_path, tiny_variables,
                                              capsys):
  counts = write_checkpoint_with_extras(tmp_path / 'model.ckpt',
                                        tiny_variables)
  outdir = tmp_path / 'export'
  official_cli.run([str(tmp_path / 'model.ckpt'), str(outdir),
                    '--max_stride', '8'])
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == (f'ignored {sum(counts.values())} checkpoint entries '
                        'that are not model weights:')
  for kind, count in counts.items():
    assert any(line.startswith(f'  {kind}: {count} (') for line in printed), (
        kind, printed)
  assert printed[-1].startswith(f'imported {len(tiny_variables)} variables')
  # The same model as from a checkpoint without the extras.
  model, config = export.load_exported_model(outdir)
  clean, clean_config = official_import.build_official_model(tiny_variables,
                                                             max_stride=8)
  assert config.to_dict() == clean_config.to_dict()
  back = official_import.official_variables(model)
  expected = official_import.official_variables(clean)
  assert sorted(back) == sorted(expected) == sorted(tiny_variables)
  for name, value in expected.items():
    np.testing.assert_array_equal(back[name], value)
  record = json.loads((outdir / 'imported_from.json').read_text())
  assert {k: len(v) for k, v in record['ignored'].items()} == counts
  assert 'fc/weight' in record['ignored'][official_import.HEAD]
  assert 'global_step' in record['ignored'][official_import.GLOBAL_STEP]


def _import_error(capsys, argv):
  """Runs ctx-import-official expecting a user error; its stderr line."""
  with pytest.raises(SystemExit) as info:
    official_cli.run(argv)
  assert info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'Traceback' not in err[0], err
  assert err[0].startswith('ctx-import-official: error: '), err
  return err[0]


def test_import_errors_are_one_line(tmp_path, tiny_variables, capsys):
  def import_(variables, name):
    folder = tmp_path / name
    folder.mkdir()
    write_tf_checkpoint(folder / 'model.ckpt', variables)
    return _import_error(capsys, [str(folder / 'model.ckpt'),
                                  str(tmp_path / f'{name}_out'),
                                  '--max_stride', '8'])

  # A missing required variable is named, even with extras around it.
  for missing in ('tformer_values/weight', 'tformer_keys/weight',
                  'resnet_tiny/conv2_x/bottleneck_0/conv1/weight'):
    variables = with_optimizer_state(tiny_variables)
    del variables[missing]
    line = import_(variables, missing.replace('/', '_'))
    assert f'missing in checkpoint: {missing}' in line, line
  # A wrong shape is named with both shapes.
  variables = dict(tiny_variables)
  variables['resnet_tiny/conv1/weight'] = np.zeros((3, 3, 3, 32), np.float32)
  line = import_(variables, 'shape')
  assert ('wrong shape: resnet_tiny/conv1/weight (checkpoint [3, 3, 3, 32], '
          'model [7, 7, 3, 32])') in line, line
  # No backbone at all: said so, not 180 missing ResNet-34 names.
  line = import_({'tformer_keys/weight': np.zeros((1, 1, 8, 4), np.float32),
                  'global_step': np.int64(3)}, 'nobackbone')
  assert 'no ResNet backbone variables' in line, line
  # A folder or a wrong prefix: the checkpoints there are named.
  write_tf_checkpoint(tmp_path / 'ok' / 'model.ckpt-100', tiny_variables)
  for given in ('ok', 'ok/model.ckpt'):
    line = _import_error(capsys, [str(tmp_path / given),
                                  str(tmp_path / 'never')])
    assert (f'cannot read a TF checkpoint at {tmp_path / given}' in line
            and f'checkpoints there: {tmp_path}/ok/model.ckpt-100' in line
            ), line
  line = _import_error(capsys, [str(tmp_path / 'nowhere' / 'model.ckpt'),
                                str(tmp_path / 'never')])
  assert f'cannot read a TF checkpoint at {tmp_path}/nowhere' in line, line
  assert not (tmp_path / 'never').exists()
  assert not any(tmp_path.glob('*_out'))
