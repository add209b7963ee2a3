"""The run's checkpoints (orbax): save, restore with verification, and a verified read.

A run's checkpoints/ folder holds, per step:
  STEP/state        the whole train state pytree (e.g. student, teacher, optimizer, centre,
                    step, PRNG key), sharded arrays written by orbax
  STEP/data         the input iterator's position, one JSON file per process (`items.py`)
  STEP/checksums/array_checksums.json
                    shape, dtype and checksum of every array of `state` (`checksums.py`)

Saves are asynchronous (the arrays are copied to host memory in `save`, written in the
background); `wait_until_finished` must run before the process exits. orbax renames a step's
folder into place only once all three items are written, so a step either has its checksums or is
not a checkpoint.

Every read checks each array it reads against its checksum: a damaged checkpoint (flipped bits, a
truncated or missing file, garbled JSON) raises `CheckpointDamagedError` rather than handing out
wrong weights. `Checkpointer.restore_latest` (resuming a run) falls back to the newest intact one;
`read_state` (a trained encoder, an export) reads a whole state or one part of it (the teacher)
in a single read.
"""
import contextlib
import logging as logging_std
import os
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from dora_jax.checkpoint import checksums
from dora_jax.checkpoint import errors
from dora_jax.checkpoint import items

# Marks, in orbax's step metadata, a checkpoint written with checksums (older ones have none).
_CHECKSUMS_MARK = "dora_array_checksums"
DAMAGED_SUFFIX = ".damaged"  # checkpoints/STEP.damaged: set aside by `restore_latest`.


# ---- The run's checkpoint manager. ----


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (each reads its own files, so damage may be local)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _damaged(directory: str, step: int, what: str) -> errors.CheckpointDamagedError:
  return errors.CheckpointDamagedError(f"checkpoint {step} in {directory} is damaged: {what}")


class Checkpointer:
  """Saves and restores {state, data-iterator state, checksums} under WORKDIR/checkpoints.

  Keeps the last few. Every process calls every method (orbax coordinates the hosts).
  """

  def __init__(self, directory: str, *, keep: int):
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.StandardCheckpointHandler()
    registry.add("state", ocp.args.StandardSave, state_handler)
    registry.add("state", ocp.args.StandardRestore, state_handler)
    _add_small_items(registry)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max(1, int(keep))),
        enable_async_checkpointing=True,
        # A save cut short by a hard kill leaves a temporary folder; it is not a checkpoint.
        cleanup_tmp_directories=True,
        create=True)
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
    self._saving = None  # The step of the save in flight.
    self._save_failed = False  # Reported once; later waits and `close` stay quiet.

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # -- Restore.

  def check_compatible(self, step: int, abstract_state: Any) -> dict | None:
    """Checks that checkpoint `step` is whole and holds the arrays of `abstract_state`.

    Returns:
      Its checksum record, or None for a checkpoint written before checksums existed.
    Raises:
      CheckpointMismatchError: it holds other arrays or shapes (another model).
      CheckpointDamagedError: its record or orbax's metadata is missing or unreadable.
    """
    record, saved = _checked_record(self._manager, self.directory, step)
    problem = checksums.describe_mismatch(saved, checksums.flat_shapes(abstract_state))
    if problem:
      raise errors.CheckpointMismatchError(
          f"the checkpoint at {self.directory}/{step} was written for a different model: "
          f"{problem}. Use a new --workdir, or the config that wrote it.")
    return record

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, data-iterator state) of `step` into the shardings `abstract_state` carries.

    Every array is checked against its checksum.

    Args:
      step: a step of `all_steps()`.
      abstract_state: the state's pytree of jax.ShapeDtypeStruct with `sharding` set.

    Raises:
      CheckpointMismatchError: the checkpoint is of another model.
      CheckpointDamagedError: a file of it is missing or unreadable, or an array differs from
        its checksum (one line: the step and what is wrong).
    """
    record = self.check_compatible(step, abstract_state)
    restored = _restore_verified(self._manager, self.directory, step, record,
                                 ocp.args.StandardRestore(abstract_state),
                                 data=items.DataStateRestore())
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, data state) of the newest intact checkpoint; None when there is no checkpoint.

    A damaged newer checkpoint is reported in one line and moved aside to STEP.damaged (the
    resumed run saves that step again); it is never deleted.

    Raises:
      CheckpointDamagedError: there are checkpoints, but none is intact; nothing was moved.
      CheckpointMismatchError: the newest readable checkpoint is of another model.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        restored = self.restore(step, abstract_state)
      except errors.CheckpointDamagedError as e:
        error = e
      if not _all_processes(error is None):
        damaged.append((step, error or _damaged(self.directory, step,
                                                "unreadable on another process")))
        continue
      for bad_step, bad_error in damaged:
        moved = self._move_aside(bad_step)
        logging.warning("%s. Moved it to %s; resuming from step %d.", bad_error, moved, step)
      logging.info("Resuming from %s/%d", self.directory, step)
      return restored
    if damaged:
      older = f" (and {len(damaged) - 1} older damaged)" if len(damaged) > 1 else ""
      raise errors.CheckpointDamagedError(
          f"no checkpoint in {self.directory} is intact: {damaged[0][1]}{older}. To start from "
          f"scratch, move {self.directory} aside and run again.")
    return None

  def _move_aside(self, step: int) -> str:
    """Renames checkpoints/STEP to STEP.damaged (process 0), so that orbax no longer lists it."""
    directory = epath.Path(self.directory)
    target = directory / f"{step}{DAMAGED_SUFFIX}"
    suffix = 1
    while target.exists():
      suffix += 1
      target = directory / f"{step}{DAMAGED_SUFFIX}-{suffix}"
    if jax.process_index() == 0:
      (directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"dora_jax moved checkpoint {step} aside")
    self._manager.reload()
    return os.fspath(target)

  # -- Save.

  def _failure(self, step: int | None, error: BaseException) -> errors.CheckpointSaveError:
    self._save_failed = True
    complete = [s for s in self._manager.all_steps() if s != step]
    last = (f"the last complete checkpoint is step {max(complete)}" if complete
            else "no checkpoint is complete yet")
    if errors.is_disk_full(error):
      return errors.CheckpointSaveError(
          f"saving checkpoint {step} to {self.directory} failed: No space left on device; "
          f"{last}. Free some space and run the same command again to resume.")
    return errors.CheckpointSaveError(
        f"saving checkpoint {step} to {self.directory} failed: {errors.first_line(error)}; "
        f"{last}.")

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices.

    Raises:
      CheckpointSaveError: this save, or the previous one still in flight, failed.
    """
    self.wait_until_finished()  # A failure of the previous save is reported as that step's.
    # The checksums are computed from the very arrays handed to orbax, before the next step
    # (which donates them) runs; orbax finalises the step only once the record is written too.
    record = {"arrays": checksums.array_record(state)}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=items.DataStateSave(data_state),
          checksums=checksums.ChecksumsSave(record)),
                         force=True, custom_metadata={_CHECKSUMS_MARK: True})
    except Exception as e:  # pylint: disable=broad-except
      raise self._failure(step, e) from e
    self._saving = step

  def reached_preemption(self, step: int) -> bool:
    """Whether the hosts agreed (jax's preemption sync point) to stop after `step`."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight is written.

    Raises:
      CheckpointSaveError: it failed (once; later calls return).
    """
    if self._save_failed:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failure(self._saving, e) from e

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._save_failed:
        raise
      # The failed save was reported; orbax re-raises it while closing, close the rest.
      logging.info("Closing the checkpoint manager after a failed save.", exc_info=True)


# ---- A verified read of a whole state, or of one part of it, without writing. ----


def read_state(checkpoint_dir: str, step: int | None = None, abstract: Any = None, *,
               part: str | None = None) -> tuple[int, Any]:
  """(step, state): checkpoint `step` of `checkpoint_dir` (None: the latest), read once and
  every array read checked against its checksum. Nothing is written.

  Args:
    checkpoint_dir: a run's checkpoints/ folder (dora-train or dora-finetune).
    step: which checkpoint; None for the latest.
    abstract: what to read into (jax.ShapeDtypeStructs with their sharding, e.g. the teacher's
      nnx.State of the run's config); None reads the arrays as saved onto the first local
      device, as plain dicts and lists.
    part: a top-level key of the state (e.g. "teacher"): only its arrays are read, and the
      part is returned; None reads the whole state.

  Raises:
    FileNotFoundError: the folder holds no finished checkpoint (of that step).
    CheckpointMismatchError: `abstract` has other arrays or shapes than the checkpoint, or the
      state has no `part`.
    CheckpointDamagedError: a file is missing or unreadable, or an array differs from its
      checksum (one line: the step and what is wrong).
  """
  manager = _open_read_only(checkpoint_dir)
  try:
    if step is None:
      step = manager.latest_step()
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{checkpoint_dir} holds no finished checkpoint"
                              + (f" for step {step}" if step is not None else "") + ".")
    record, saved = _checked_record(manager, checkpoint_dir, step)
    what = "the state"
    if part is not None:
      what = f"the {part!r} part of the state"
      prefix = part + "/"
      parts = sorted({path.split("/")[0] for path in saved})
      saved = {path[len(prefix):]: shape for path, shape in saved.items()
               if path.startswith(prefix)}
      if not saved:
        raise errors.CheckpointMismatchError(
            f"checkpoint {step} in {checkpoint_dir} has no {part!r} in its state (it holds "
            f"{', '.join(parts)}): pass a checkpoint of the kind that has one.")
    if abstract is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      tree = _state_tree(manager, step)
      abstract = jax.tree.map(
          lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device),
          tree[part] if part is not None else tree)
    else:
      problem = checksums.describe_mismatch(saved, checksums.flat_shapes(abstract))
      if problem:
        raise errors.CheckpointMismatchError(
            f"{what} in checkpoint {step} of {checkpoint_dir} is of another model: {problem}")
    item = {part: abstract} if part is not None else abstract
    restored = _restore_verified(manager, checkpoint_dir, step, record, ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))["state"]
  finally:
    manager.close()
  return step, restored[part] if part is not None else restored


def state_metadata(checkpoint_dir: str, step: int) -> Any:
  """orbax's metadata of the state of checkpoint `step`: per array its shape, dtype and the
  sharding it was saved with (None when it is missing or unreadable)."""
  manager = _open_read_only(checkpoint_dir)
  try:
    return _state_tree(manager, step)
  finally:
    manager.close()


# ---- orbax, and the checks every read makes. ----


def _add_small_items(registry: ocp.handlers.DefaultCheckpointHandlerRegistry) -> None:
  data_handler = items.DataStateHandler()
  registry.add("data", items.DataStateSave, data_handler)
  registry.add("data", items.DataStateRestore, data_handler)
  checksums_handler = checksums.ChecksumsHandler()
  registry.add("checksums", checksums.ChecksumsSave, checksums_handler)
  registry.add("checksums", checksums.ChecksumsRestore, checksums_handler)


def _open_read_only(checkpoint_dir: str) -> ocp.CheckpointManager:
  """A CheckpointManager that reads (never writes) a run's checkpoints; `state` restores through
  PyTreeRestore (a part of the state, e.g. only the teacher)."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  _add_small_items(registry)
  with _absl_quiet("Given directory is read only"):  # That is what we ask for.
    return ocp.CheckpointManager(
        checkpoint_dir, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0),
        handler_registry=registry)


def _checked_record(manager: ocp.CheckpointManager, directory: str, step: int
                    ) -> tuple[dict | None, dict[str, tuple[int, ...]]]:
  """(checksum record or None for a checkpoint written without one, the state's shapes as
  orbax's metadata lists them) of `step`, checked to agree.

  Raises:
    CheckpointDamagedError: the record or orbax's metadata is missing, unreadable or disagrees.
  """
  try:
    record = _read_record(manager, step)
  except errors.DamagedFileError as e:
    raise _damaged(directory, step, str(e)) from None
  saved = _orbax_shapes(manager, step)
  if saved is None:
    raise _damaged(directory, step, "state/_METADATA is missing or unreadable")
  if record is not None and saved != checksums.record_shapes(record):
    raise _damaged(directory, step, f"state/_METADATA disagrees with {checksums.CHECKSUMS_FILE}")
  return record, saved


def _restore_verified(manager: ocp.CheckpointManager, directory: str, step: int,
                      record: dict | None, state_args: ocp.args.CheckpointArgs,
                      **other_items: ocp.args.CheckpointArgs) -> dict:
  """orbax's restore of `step` ({"state": ..., **other_items}); every array of the state read
  is checked against `record`.

  Raises:
    CheckpointMismatchError: an item does not fit (e.g. another number of processes).
    CheckpointDamagedError: a file cannot be read, or an array differs from its checksum.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=state_args, **other_items))
  except errors.CheckpointMismatchError:
    raise
  except errors.DamagedFileError as e:
    raise _damaged(directory, step, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # Whatever orbax or tensorstore raise on a broken file (there is no common type).
    raise _damaged(directory, step, f"cannot read it ({errors.first_line(e)})") from e
  if record is None:
    logging.warning("Checkpoint %d in %s has no checksums (written by an older dora-jax): "
                    "restored without verifying it.", step, directory)
  else:
    problem = checksums.differing_arrays(record["arrays"],
                                         checksums.array_record(restored["state"]))
    if problem:
      raise _damaged(directory, step, problem)
  return restored


def _read_record(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The checksum record of `step`; None for a checkpoint written without one."""
  try:
    with _absl_quiet("could not be restored"):  # The state's metadata is checked on its own.
      has_record = bool(manager.metadata(step).custom_metadata.get(_CHECKSUMS_MARK))
  except Exception:  # pylint: disable=broad-except
    has_record = None  # orbax's step metadata is unreadable: look for the record itself.
  step_dir = epath.Path(manager.directory) / str(step)
  if has_record is None:
    has_record = (step_dir / "checksums").exists()
  if not has_record:
    return None
  return checksums.ChecksumsHandler().restore(step_dir / "checksums")


def _state_tree(manager: ocp.CheckpointManager, step: int) -> Any:
  """orbax's metadata tree of the state of `step`; None if it is missing or unreadable."""
  try:
    # Without its metadata orbax warns that it cannot restore "state": we say it better.
    with _absl_quiet("could not be restored"):
      metadata = manager.item_metadata(step)["state"]
  except Exception:  # pylint: disable=broad-except
    return None
  if metadata is None:
    return None
  return metadata.tree if hasattr(metadata, "tree") else metadata


def _orbax_shapes(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The array shapes orbax's metadata of `step` lists; None if it is missing or unreadable."""
  tree = _state_tree(manager, step)
  shapes = checksums.flat_shapes(tree) if tree is not None else None
  return shapes or None


@contextlib.contextmanager
def _absl_quiet(text: str):
  """Drops the absl (orbax) log records that contain `text` while the block runs."""
  quiet = logging_std.Filter()
  quiet.filter = lambda record: text not in record.getMessage()
  logging_std.getLogger("absl").addFilter(quiet)
  try:
    yield
  finally:
    logging_std.getLogger("absl").removeFilter(quiet)
