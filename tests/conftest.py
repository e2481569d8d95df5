"""Test set-up: CPU only, 8 fake devices, quiet TensorFlow.

The device count must be set before JAX touches a device, so this runs
before any test module imports the code under test.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Compilation dominates these tiny CPU tests; XLA's optimisation passes
# roughly double it. Subprocesses (CLI tests) inherit this too.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# ctx_jax sets its default XLA flags (xla_config) when imported; import it
# before any test module can start a JAX backend, so this process runs the
# same XLA:CPU kernels as the command-line runs it spawns (which import
# ctx_jax first): the resume and launch tests compare the two bit for bit.
import ctx_jax  # pylint: disable=g-import-not-at-top,unused-import

jax.config.update("jax_num_cpu_devices", 8)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
  """The read-only `shared/` folder beside the checkout (fixtures)."""
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} not found: the shared fixtures sit beside the repo")
  return SHARED
