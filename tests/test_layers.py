"""The package's layers import downward only, and no module imports itself through a cycle.

Read from the source with `ast` (top-level and late imports alike), so a late import inside a
function counts too. Every module belongs to a layer: a new one that no layer names fails here.
"""
import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dora_jax")

# The layers, bottom up: a module imports only from its own layer or lower ones (within a layer,
# without a cycle). The folder tree is this table: one package (or top-level module) per entry.
LAYERS = {
    # The method and its contract: pure kernels, the loss, config keys, paths.
    0: ("dora_jax", "dora_jax.tracking", "dora_jax.losses", "dora_jax.config_base",
        "dora_jax.paths"),
    1: ("dora_jax.models", "dora_jax.data",  # Know nothing of training; data never imports jax.
        "dora_jax.checkpoint"),  # The run folder: checkpoints, their checksums, lock, config file.
    2: ("dora_jax.objects",),  # DoRA's views from any teacher's outputs (kernels + the ViT).
    3: ("dora_jax.evaluation",),  # Takes a backbone; knows nothing of training.
    4: ("dora_jax.trainer",),  # Runs the evaluators during pretraining.
    5: ("dora_jax.pretrained",),  # Reads a run's teacher (through dora_jax.checkpoint).
    6: ("dora_jax.finetune",),
    7: ("dora_jax.cli",),  # One module per console script; `runner`, shared by two.
}


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
  """The layer of the longest entry of LAYERS that names `module` or a package above it."""
  matches = [(len(p), layer) for layer, prefixes in LAYERS.items() for p in prefixes
             if module == p or (p != "dora_jax" and module.startswith(p + "."))]
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


def test_every_module_has_a_layer():
  unplaced = sorted(module for module in _graph() if _layer(module) is None)
  assert not unplaced, f"modules that no layer in LAYERS names: {unplaced}"


def test_layers_import_downward_only():
  wrong = []
  for module, targets in _graph().items():
    layer = _layer(module)
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
      # config_base: the `data` keys' declaration, which the view settings are built from.
      assert all(t.startswith("dora_jax.data") or t in ("dora_jax.paths", "dora_jax.config_base")
                 for t in targets), (module, targets)
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


def test_only_the_checkpoint_package_imports_orbax():
  """One owner of the run folder: whatever reads or writes orbax files goes through it."""
  importers = []
  for directory, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        with open(path) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
          if any(m == "orbax" or m.startswith("orbax.") for m in modules):
            importers.append(_module_name(path))
  assert importers and all(m.startswith("dora_jax.checkpoint.") for m in importers), importers


def test_loading_an_encoder_does_not_import_the_trainer():
  """load_backbone and the exported folders take the model's shapes from dora_jax.models and
  read through dora_jax.checkpoint: nothing of the trainer (directly or through another module)."""
  graph = _graph()
  reached, todo = set(), ["dora_jax.pretrained"]
  while todo:
    for target in graph[todo.pop()]:
      if target not in reached:
        reached.add(target)
        todo.append(target)
  assert "dora_jax.pretrained.backbone" in reached
  trainer = sorted(m for m in reached if m.startswith(("dora_jax.trainer", "dora_jax.finetune")))
  assert not trainer, f"dora_jax.pretrained imports {trainer}"
