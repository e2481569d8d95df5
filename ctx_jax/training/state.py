"""The train state (model + optimiser) built from a config; no TensorFlow.

Shared by the training loop (`train.py`) and tools that must run on hosts
without TensorFlow (benchmarks/train_step_bench.py).
"""

from flax import nnx
import jax
import ml_collections

from ctx_jax import mesh as mesh_lib
from ctx_jax import models
from ctx_jax.training import optim


def build_train_state(config: ml_collections.ConfigDict):
  """`(model, optimizer)` of `config`, initialised from `config.seed`."""
  model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optimizer),
                            wrt=nnx.Param)
  return model, optimizer


def create_train_state(config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh):
  """Model and optimiser with every array replicated over `mesh`."""

  @nnx.jit
  def create():
    model, optimizer = build_train_state(config)
    # Born replicated on the mesh: every process holds the same values.
    for module in (model, optimizer):
      state = nnx.state(module)
      nnx.update(module, jax.lax.with_sharding_constraint(
          state, mesh_lib.replicated(mesh)))
    return model, optimizer

  with jax.set_mesh(mesh):
    return create()


def abstract_train_state(config: ml_collections.ConfigDict):
  """Shapes-only `(model, optimizer)` (`nnx.eval_shape`): for lowering."""
  return nnx.eval_shape(lambda: build_train_state(config))
