"""Agreement with the official TF CTX on the shared fixture.

The fixture (shared/fixtures/official_ctx, see its README) holds an official
checkpoint (ResNet-34 stride 16 + CTX head), an episode, and the official
float32 and float64 outputs. We import the checkpoint, run the episode in
train and eval mode, and compare with the README's suggested tolerances:
logits atol 2e-4, losses atol 2e-5, embeddings atol 1e-3, gradients relative
L2 <= 1e-3 (transformer kernels), 2e-2 (conv5), 5e-2 (earlier layers); and,
in float64 against `expected_f64.npz`, rtol 1e-6 on everything.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ctx_jax import xla_config
from ctx_jax.checkpoints import official as official_import

GRADIENT_RTOL = {
    'tformer_keys__weight': 1e-3,
    'tformer_values__weight': 1e-3,
    'resnet34__conv5_x__bottleneck_0__conv2__weight': 2e-2,
    'resnet34__conv5_x__bottleneck_2__conv2__weight': 2e-2,
    'resnet34__conv5_x__bottleneck_2__conv2__batch_norm__scale': 2e-2,
    'resnet34__conv5_x__bottleneck_2__conv2__batch_norm__offset': 2e-2,
    'resnet34__conv1__weight': 5e-2,
    'resnet34__conv1__batch_norm__scale': 5e-2,
    'resnet34__conv1__batch_norm__offset': 5e-2,
    'resnet34__conv3_x__bottleneck_0__identity__projection_conv__weight': 5e-2,
}
ATOL = {'logits': 2e-4, 'loss': 2e-5, 'support_emb': 1e-3, 'query_emb': 1e-3}


@pytest.fixture(scope='module')
def fixture_dir(shared_dir):
  return shared_dir / 'fixtures' / 'official_ctx'


@pytest.fixture(scope='module')
def expected(fixture_dir):
  with np.load(fixture_dir / 'expected.npz') as data:
    return dict(data)


@pytest.fixture(scope='module')
def outputs(fixture_dir, expected):
  variables = official_import.read_official_checkpoint(
      str(fixture_dir / 'model.ckpt'))
  model, _ = official_import.build_official_model(variables)
  with np.load(fixture_dir / 'episode.npz') as episode:
    return official_import.episode_outputs(
        model, dict(episode), gradient_names=[
            k.replace('__', '/') for k in expected['gradient_keys']])


def relative_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('quantity', sorted(ATOL))
def test_forward_matches_official(outputs, expected, quantity, mode):
  key = f'{quantity}_{mode}'
  assert outputs[key].shape == expected[key].shape
  assert outputs[key].dtype == np.float32
  np.testing.assert_allclose(outputs[key], expected[key], rtol=0,
                             atol=ATOL[quantity])


def test_gradients_match_official(outputs, expected):
  assert list(outputs['gradient_keys']) == list(expected['gradient_keys'])
  errors = {k: relative_l2(outputs[k], expected[k])
            for k in expected['gradient_keys']}
  for key, error in errors.items():
    assert outputs[key].shape == expected[key].shape, key
    assert error <= GRADIENT_RTOL[key], (key, error)


_FLOAT64_SCRIPT = r"""
import json, sys
import numpy as np
from ctx_jax.checkpoints import official as official_import
folder = sys.argv[1]
variables = official_import.read_official_checkpoint(folder + '/model.ckpt')
model, _ = official_import.build_official_model(variables, dtype='float64')
expected = dict(np.load(folder + '/expected_f64.npz'))
episode = {k: v.astype(np.float64) if v.dtype == np.float32 else v
           for k, v in np.load(folder + '/episode.npz').items()}
names = [k.replace('__', '/') for k in expected['gradient_keys']]
out = official_import.episode_outputs(model, episode, gradient_names=names)
errors = {k: float(np.max(np.abs(out[k] - expected[k])) /
                   max(np.max(np.abs(expected[k])), 1e-30))
          for k in expected if k != 'gradient_keys'}
print(json.dumps({'errors': errors, 'dtype': str(out['logits_train'].dtype)}))
"""


def test_float64_matches_official_float64(fixture_dir):
  # x64 is process-wide, so this runs in a subprocess.
  # XLA:CPU's Eigen convolutions (ctx_jax's default, for float32 speed) are
  # about 8x slower than its YNNPACK ones in float64: use jaxlib's default.
  # This process's XLA_FLAGS already hold ctx_jax's flag (conftest): drop it.
  env = dict(os.environ, JAX_ENABLE_X64='1', JAX_PLATFORMS='cpu',
             CTX_JAX_XLA_DEFAULTS='0', XLA_FLAGS=os.environ.get(
                 'XLA_FLAGS', '').replace(xla_config.CPU_CONV_FLAG, ''))
  result = subprocess.run(
      [sys.executable, '-c', _FLOAT64_SCRIPT, str(fixture_dir)], env=env,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['dtype'] == 'float64'
  for key, error in report['errors'].items():
    assert error <= 1e-6, (key, error)
