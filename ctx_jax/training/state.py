"""The train state (model + optimiser) built from a config; no TensorFlow.

Shared by the training loop (`train.py`) and tools that must run on hosts
without TensorFlow (benchmarks/train_step_bench.py).
"""

from flax import nnx
import jax
import ml_collections

from ctx_jax import mesh as mesh_lib
from ctx_jax import models
from ctx_jax.checkpoints import export
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


def init_backbone_from(model: nnx.Module, export_dir: str,
                       mesh: jax.sharding.Mesh | None = None) -> int:
  """Copies the backbone (not the transformer head) of an export into `model`.

  Mirrors the official warm start, which restores backbone variables and
  their batch-norm EMA statistics but no `tformer_*` variable.

  Returns:
    The number of arrays copied.
  """
  source, _ = export.load_exported_model_or_explain(export_dir, mesh=mesh)
  src = nnx.to_flat_state(nnx.state(source))
  src = {path: var for path, var in src}
  state = nnx.state(model)
  copied = 0
  new_flat = []
  for path, var in nnx.to_flat_state(state):
    is_head = any(str(p).startswith("tformer") for p in path)
    if not is_head and path in src:
      value = src[path].get_value()
      if value.shape != var.get_value().shape:
        raise ValueError(f"init_from {export_dir}: {'/'.join(map(str, path))}"
                         f" has shape {value.shape}, expected "
                         f"{var.get_value().shape}")
      var = var.replace(value)
      copied += 1
    new_flat.append((path, var))
  if not copied:
    raise ValueError(f"init_from {export_dir}: no backbone variable matches "
                     "this model (different backbone?)")
  nnx.update(model, nnx.from_flat_state(new_flat))
  return copied
