"""The package's layers import downward only, and no module imports itself through a cycle.

Read from the source with `ast` (top-level and late imports alike), so a late import inside a
function counts too.
"""
import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dora_jax")

# Layer of each module (lower layers never import higher ones). Modules of one layer may import
# each other as long as there is no cycle.
LAYERS = {
    0: ("dora_jax.export", "dora_jax.torch_checkpoint", "dora_jax.tracking", "dora_jax.losses", "dora_jax.schedules", "dora_jax.visualize",
        "dora_jax.sharding", "dora_jax.metrics", "dora_jax.config_base", "dora_jax.data",
        "dora_jax.optim", "dora_jax.paths", "dora_jax.flops", "dora_jax.compilation",
        "dora_jax.models"),
    1: ("dora_jax.objects", "dora_jax.checkpoints", "dora_jax.checkpoint_items",
        "dora_jax.workdir_lock"),
    2: ("dora_jax.train_step",),
    3: ("dora_jax.pretrained", "dora_jax.preflight", "dora_jax.evaluation", "dora_jax.finetune"),
    4: ("dora_jax.train",),
    5: ("dora_jax.main", "dora_jax.eval_main", "dora_jax.export_main"),
    6: ("dora_jax.finetune.main",),  # dora-finetune reuses dora-train's flags and errors.
}
# Modules outside the table (command lines added later) sit on top: anything may be below.


def _module_name(path):
  relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-len(".py")]
  name = relative.replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _imports(path):
  """The dora_jax modules that the file at `path` imports."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names if alias.name.startswith("dora_jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dora_jax"):
      # `from dora_jax.data import pipeline` imports the module dora_jax.data.pipeline.
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _graph():
  modules = {}
  for directory, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        modules[_module_name(path)] = path
  graph = {}
  for module, path in modules.items():
    targets = set()
    for name in _imports(path):
      while name not in modules and "." in name:  # `from pkg.mod import function`.
        name = name.rsplit(".", 1)[0]
      if name in modules and name != module:
        targets.add(name)
    graph[module] = targets
  return graph


def _layer(module):
  """The layer of the longest prefix in LAYERS that names `module` or a package above it."""
  matches = [(len(p), layer) for layer, prefixes in LAYERS.items() for p in prefixes
             if module == p or module.startswith(p + ".")]
  return max(matches)[1] if matches else None


def test_there_is_no_import_cycle():
  graph = _graph()
  state = {}

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        cycle = stack[stack.index(target):] + [target]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if target not in state:
        visit(target, stack + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_layers_import_downward_only():
  wrong = []
  for module, targets in _graph().items():
    layer = _layer(module)
    if layer is None:
      continue
    for target in targets:
      target_layer = _layer(target)
      if target_layer is None or target_layer > layer:
        wrong.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
  assert not wrong, "\n".join(wrong)


def test_kernels_data_and_models_know_nothing_of_training():
  graph = _graph()
  tracking_imports = graph["dora_jax.tracking"]
  assert not tracking_imports, f"tracking.py must depend on nothing of ours: {tracking_imports}"
  for module, targets in graph.items():
    if module.startswith("dora_jax.data"):
      assert all(t.startswith("dora_jax.data") or t == "dora_jax.paths" for t in targets), (
          module, targets)
    if module.startswith("dora_jax.models"):
      assert all(t.startswith("dora_jax.models") for t in targets), (module, targets)


def test_data_package_never_imports_jax():
  """grain's worker processes import dora_jax.data: jax must not come with it."""
  for directory, _, files in os.walk(os.path.join(PACKAGE_DIR, "data")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(directory, name)) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
          assert not any(m == "jax" or m.startswith(("jax.", "flax", "optax", "orbax"))
                         for m in modules), f"data/{name} imports {modules}"
