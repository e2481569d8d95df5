"""Tests of the official-checkpoint import and the two console mains."""

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


def test_optimizer_variables_are_recognised():
  for name in ['resnet34/conv1/weight/Adam', 'tformer_keys/weight/Adam_1',
               'beta1_power', 'beta2_power', 'global_step', 'Adam/iter',
               'optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE']:
    assert official_import.is_optimizer_variable(name), name
  for name in ['resnet34/conv1/weight', 'tformer_values/weight',
               'resnet34/conv2_x/bottleneck_0/conv1/batch_norm/var_ema']:
    assert not official_import.is_optimizer_variable(name), name


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
               'conv2/weight', 'missing in checkpoint: tformer_values/weight',
               'wrong shape: resnet_tiny/conv1/batch_norm/scale: checkpoint '
               '[32], model [1, 1, 1, 32]',
               'wrong shape: tformer_keys/weight: checkpoint [1, 1, 128, 8], '
               'model [1, 1, 128, 16]',
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
