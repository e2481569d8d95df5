"""The package's layers point one way (ARCHITECTURE.md), with no cycles.

Every import of every module, including imports inside functions, is read
from the source (nothing is executed), so a test fails as soon as a lower
layer reaches up, whether or not that code path runs in the suite.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("meta_dataset_pipeline", "ctx_jax", "experiments", "launch")

# Lowest first. A module may import modules of its own layer or below; the
# longest prefix that matches a module's name gives its layer.
LAYERS = (
    ("pipeline", ("meta_dataset_pipeline",)),
    ("base", ("ctx_jax", "ctx_jax.xla_config", "ctx_jax.distributed",
              "ctx_jax.demo", "ctx_jax.demo.glyphs", "ctx_jax.demo.render")),
    ("models and data", ("ctx_jax.models", "ctx_jax.data", "ctx_jax.mesh",
                         "ctx_jax.config_checks")),
    ("checkpoints", ("ctx_jax.checkpoints",)),
    ("eval", ("ctx_jax.eval",)),
    ("training", ("ctx_jax.training",)),
    ("configs", ("experiments",)),
    ("entry points", ("ctx_jax.main", "ctx_jax.eval.main",
                      "ctx_jax.eval.attention_main",
                      "ctx_jax.checkpoints.official_cli", "ctx_jax.demo.run",
                      "ctx_jax.demo.dataset", "launch")),
)
# Accelerator-side code runs where TensorFlow may be missing.
TF_FREE = ("ctx_jax.models", "ctx_jax.mesh", "ctx_jax.training.train_step",
           "ctx_jax.training.sharded_step", "ctx_jax.training.state",
           "ctx_jax.training.optim", "ctx_jax.eval.step",
           "ctx_jax.checkpoints.export", "ctx_jax.checkpoints.train_state")
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "chex", "ctx_jax")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      out[_module_name(path)] = path
  return out


MODULES = _modules()


def _imports(path: pathlib.Path, top_level_only: bool = False):
  """(imported module, line) pairs; `from a import b` counts a.b if a module."""
  tree = ast.parse(path.read_text(), str(path))
  nodes = tree.body if top_level_only else ast.walk(tree)
  for node in nodes:
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module, node.lineno
      for alias in node.names:
        if f"{node.module}.{alias.name}" in MODULES:
          yield f"{node.module}.{alias.name}", node.lineno


def _rank(name: str) -> int | None:
  best = None
  for rank, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if name == prefix or name.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (rank, len(prefix))
  return None if best is None else best[0]


def _allowed(importer: str, imported: str) -> bool:
  a, b = _rank(importer), _rank(imported)
  return a is None or b is None or b <= a


def _internal_edges():
  for name, path in MODULES.items():
    for imported, line in _imports(path):
      if imported in MODULES and imported != name:
        yield name, imported, line


def test_every_module_has_a_layer():
  assert not [m for m in MODULES if _rank(m) is None]


def test_no_upward_import():
  upward = [f"{MODULES[a].relative_to(ROOT)}:{line} imports {b} "
            f"({LAYERS[_rank(a)][0]} -> {LAYERS[_rank(b)][0]})"
            for a, b, line in _internal_edges() if not _allowed(a, b)]
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  graph = {}
  for a, b, _ in _internal_edges():
    # A package's __init__ importing its own submodules is not a cycle of
    # layers (ctx_jax.models re-exports its classes).
    if not b.startswith(a + "."):
      graph.setdefault(a, set()).add(b)
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_pipeline_never_imports_jax():
  bad = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
         for name, path in MODULES.items()
         if name.startswith("meta_dataset_pipeline")
         for imported, line in _imports(path)
         if imported.split(".")[0] in JAX_STACK]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("prefix", TF_FREE)
def test_accelerator_code_does_not_need_tensorflow(prefix):
  bad = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
         for name, path in MODULES.items()
         if name == prefix or name.startswith(prefix + ".")
         for imported, line in _imports(path, top_level_only=True)
         if imported.split(".")[0] in ("tensorflow", "meta_dataset_pipeline",
                                       "tensorflow_datasets")]
  assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import():
  # The rules themselves: models may not import training, eval may not
  # import training, the pipeline may not import ctx_jax.
  assert not _allowed("ctx_jax.models.learner", "ctx_jax.training.train")
  assert not _allowed("ctx_jax.eval.evaluate", "ctx_jax.training.train_step")
  assert not _allowed("ctx_jax.checkpoints.export", "ctx_jax.eval.step")
  assert not _allowed("meta_dataset_pipeline.reader", "ctx_jax.models")
  assert _allowed("ctx_jax.training.train", "ctx_jax.eval.evaluate")
  assert _allowed("ctx_jax.main", "ctx_jax.training.train")
