"""Checkpoints of a training run (orbax), and `load_backbone` for the trained encoder.

A run's work folder holds:
  WORKDIR/config.json             the config the run was started with
  WORKDIR/checkpoints/STEP/state  the whole train state pytree (student, teacher, optimizer,
                                  centre, step, PRNG key), sharded arrays written by orbax
  WORKDIR/checkpoints/STEP/data   the input iterator's position, one JSON file per process

Saves are asynchronous (the arrays are copied to host memory in `save`, written in the
background); `wait_until_finished` must run before the process exits.
"""
import dataclasses
import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from dora_jax import export

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class CheckpointMismatchError(ValueError):
  """A checkpoint in the work folder does not fit the model of the current config."""


# ---- The data iterator's state: one small JSON file per process. ----


def _data_state_file(directory: epath.Path, process_index: int, process_count: int) -> epath.Path:
  return directory / f"process_{process_index}-of-{process_count}.json"


class DataStateHandler(ocp.CheckpointHandler):
  """Saves each process's input-iterator state (a JSON-able dict) beside the arrays.

  Every process writes its own file: the hosts read different clips, so their positions differ.
  """

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = _data_state_file(directory, jax.process_index(), jax.process_count())
    path.write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> dict:
    path = _data_state_file(directory, jax.process_index(), jax.process_count())
    if not path.exists():
      written = sorted(p.name for p in directory.glob("process_*.json"))
      raise CheckpointMismatchError(
          f"{path} does not exist (the checkpoint holds {written}): resume with the number of "
          f"processes that wrote it.")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ---- Shape checks. ----


def _key_name(entry: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'student/backbone/.../kernel' -> shape, for arrays, ShapeDtypeStructs or orbax metadata.

  Path entries are reduced to their names, so that a restored tree (plain dicts) and the live one
  (nnx.State, optax named tuples) give the same paths.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(entry) for entry in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def describe_mismatch(saved: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]]) -> str | None:
  """A one-line description of how two flat shape dicts differ, or None when they agree."""
  # The student's parameters first: they name the layer a user would recognise.
  for path in sorted(expected, key=lambda p: (not p.startswith("student"), p)):
    if path in saved and saved[path] != expected[path]:
      return f"{path} has shape {saved[path]} in the checkpoint but {expected[path]} in this config"
  missing = sorted(set(expected) - set(saved))
  if missing:
    return f"{len(missing)} arrays of this config are not in the checkpoint (e.g. {missing[0]})"
  extra = sorted(set(saved) - set(expected))
  if extra:
    return f"the checkpoint has {len(extra)} arrays this config does not (e.g. {extra[0]})"
  return None


# ---- The run's checkpoint manager. ----


class Checkpointer:
  """Saves and restores {state, data-iterator state} under WORKDIR/checkpoints, keeping the last few.

  Every process calls every method (orbax coordinates the hosts).
  """

  def __init__(self, directory: str, *, keep: int):
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.StandardCheckpointHandler()
    registry.add("state", ocp.args.StandardSave, state_handler)
    registry.add("state", ocp.args.StandardRestore, state_handler)
    data_handler = DataStateHandler()
    registry.add("data", DataStateSave, data_handler)
    registry.add("data", DataStateRestore, data_handler)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max(1, int(keep))),
        enable_async_checkpointing=True,
        # A save cut short by a hard kill leaves a temporary folder; it is not a checkpoint.
        cleanup_tmp_directories=True,
        create=True)
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError when checkpoint `step` has other arrays or shapes."""
    metadata = self._manager.item_metadata(step)["state"]
    saved = flat_shapes(metadata.tree if hasattr(metadata, "tree") else metadata)
    problem = describe_mismatch(saved, flat_shapes(abstract_state))
    if problem:
      raise CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} was written for a different model: "
          f"{problem}. Use a new --workdir, or the config that wrote it.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, data-iterator state) of `step` into the shardings `abstract_state` carries.

    Args:
      step: a step of `all_steps()`.
      abstract_state: the state's pytree of jax.ShapeDtypeStruct with `sharding` set.
    """
    self.check_compatible(step, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
    return restored["state"], restored["data"]

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStateSave(data_state)), force=True)

  def reached_preemption(self, step: int) -> bool:
    """Whether the hosts agreed (jax's preemption sync point) to stop after `step`."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Keeps the config of a run beside its checkpoints (read back by `load_backbone`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(json.load(f))


def _resolve_run(path: str) -> tuple[str, str, int | None]:
  """(workdir, checkpoint dir, step or None for the latest) of a work folder or a step folder."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    return path, os.path.join(path, CHECKPOINT_DIR), None
  parent, name = os.path.split(path)
  grandparent = os.path.dirname(parent)
  if (name.isdigit() and os.path.basename(parent) == CHECKPOINT_DIR
      and os.path.exists(os.path.join(grandparent, CONFIG_FILE))):
    return grandparent, parent, int(name)
  raise FileNotFoundError(
      f"{path} is not a dora-train work folder (no {CONFIG_FILE}) nor one of its "
      f"{CHECKPOINT_DIR}/STEP folders: pass the --workdir of a training run.")


def load_backbone(path: str):
  """The teacher's ViT backbone of a training run, with its trained weights.

  The teacher (the EMA of the student) is the encoder DINO and DoRA evaluate and release.

  Args:
    path: a `dora-train` work folder (its latest checkpoint is used), one of its
      `checkpoints/STEP` folders, or a folder written by `dora-export`.

  Returns:
    A `dora_jax.models.vit` VisionTransformer: called on float32 normalised images (B, H, W, 3),
    H and W divisible by its patch size, it returns the dict of the public contract (`cls`,
    `tokens`, `attn`, `q`, `k`).

  Raises:
    FileNotFoundError: `path` is not a work folder or has no checkpoint; nothing falls back to
      other weights.
    export.ExportError: an exported folder whose description or parameters are broken.
  """
  if export.is_exported(path):
    return export.load_exported(path)
  workdir, checkpoint_dir, step = _resolve_run(path)
  from dora_jax import train  # Late import: train imports this module.
  from dora_jax import train_step
  config = read_config(workdir)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  manager = ocp.CheckpointManager(
      checkpoint_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      handler_registry=registry)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"{checkpoint_dir} holds no finished checkpoint"
                            + (f" for step {step}" if step is not None else "") + ".")
  graphdef, abstract_state = train.abstract_train_state(config, steps_per_epoch=1, total_steps=1)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_teacher = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      abstract_state["teacher"])
  saved = flat_shapes(manager.item_metadata(step)["state"].tree["teacher"])
  problem = describe_mismatch(saved, flat_shapes(abstract_teacher))
  if problem:
    raise CheckpointMismatchError(
        f"the teacher in {checkpoint_dir}/{step} does not match {workdir}/{CONFIG_FILE}: {problem}.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"teacher": abstract_teacher},
      restore_args=ocp.checkpoint_utils.construct_restore_args({"teacher": abstract_teacher}),
      partial_restore=True)))
  manager.close()
  state = dict(abstract_state, teacher=restored["state"]["teacher"])
  return train_step.teacher_backbone(graphdef, state)
