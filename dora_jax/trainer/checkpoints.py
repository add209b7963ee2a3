"""Checkpoints of a training run (orbax): save, restore, and the run's config file.

A run's work folder holds:
  WORKDIR/config.json             the config the run was started with
  WORKDIR/checkpoints/STEP/state  the whole train state pytree (student, teacher, optimizer,
                                  centre, step, PRNG key), sharded arrays written by orbax
  WORKDIR/checkpoints/STEP/data   the input iterator's position, one JSON file per process
  WORKDIR/checkpoints/STEP/checksums/array_checksums.json
                                  shape, dtype and checksum of every array of `state`

Saves are asynchronous (the arrays are copied to host memory in `save`, written in the
background); `wait_until_finished` must run before the process exits. orbax renames a step's
folder into place only once all three items are written, so a step either has its checksums or is
not a checkpoint.

A restore checks each array against its checksum: a damaged checkpoint (flipped bits, a truncated
or missing file, garbled JSON) raises `CheckpointDamagedError` rather than resuming from wrong
weights, and `Checkpointer.restore_latest` falls back to the newest intact one.
"""
import contextlib
import errno
import json
import logging as logging_std
import os
import signal
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dora_jax import paths
from dora_jax.trainer.checkpoint_items import CHECKSUMS_FILE
from dora_jax.trainer.checkpoint_items import CheckpointMismatchError
from dora_jax.trainer.checkpoint_items import ChecksumsHandler
from dora_jax.trainer.checkpoint_items import ChecksumsRestore
from dora_jax.trainer.checkpoint_items import ChecksumsSave
from dora_jax.trainer.checkpoint_items import DataStateHandler
from dora_jax.trainer.checkpoint_items import DataStateRestore
from dora_jax.trainer.checkpoint_items import DataStateSave
from dora_jax.trainer.checkpoint_items import _DamagedFile
from dora_jax.trainer.checkpoint_items import _differing_arrays
from dora_jax.trainer.checkpoint_items import _first_line
from dora_jax.trainer.checkpoint_items import _record_shapes
from dora_jax.trainer.checkpoint_items import array_record
from dora_jax.trainer.checkpoint_items import describe_mismatch
from dora_jax.trainer.checkpoint_items import flat_shapes

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Marks, in orbax's step metadata, a checkpoint written with checksums (older ones have none).
_CHECKSUMS_MARK = "dora_array_checksums"
DAMAGED_SUFFIX = ".damaged"  # checkpoints/STEP.damaged: set aside by `restore_latest`.


class CheckpointDamagedError(ValueError):
  """A checkpoint's files are missing, unreadable or differ from the checksums saved with them."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full); older checkpoints are intact."""


def _is_disk_full(error: BaseException) -> bool:
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


# ---- The run's checkpoint manager. ----


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (each reads its own files, so damage may be local)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


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

  def _damaged(self, step: int, what: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"checkpoint {step} in {self.directory} is damaged: {what}")

  def check_compatible(self, step: int, abstract_state: Any) -> dict | None:
    """Checks that checkpoint `step` is whole and holds the arrays of `abstract_state`.

    Returns:
      Its checksum record, or None for a checkpoint written before checksums existed.
    Raises:
      CheckpointMismatchError: it holds other arrays or shapes (another model).
      CheckpointDamagedError: its record or orbax's metadata is missing or unreadable.
    """
    try:
      record = _read_record(self._manager, step)
    except _DamagedFile as e:
      raise self._damaged(step, str(e)) from None
    saved = _orbax_shapes(self._manager, step)
    if saved is None:
      raise self._damaged(step, "state/_METADATA is missing or unreadable")
    if record is not None and saved != _record_shapes(record):
      raise self._damaged(step, f"state/_METADATA disagrees with {CHECKSUMS_FILE}")
    problem = describe_mismatch(saved, flat_shapes(abstract_state))
    if problem:
      raise CheckpointMismatchError(
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
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
    except CheckpointMismatchError:
      raise
    except _DamagedFile as e:
      raise self._damaged(step, str(e)) from None
    except Exception as e:  # pylint: disable=broad-except
      # Whatever orbax or tensorstore raise on a broken file (there is no common type).
      raise self._damaged(step, f"cannot read it ({_first_line(e)})") from e
    if record is None:
      logging.warning("Checkpoint %d in %s has no checksums (written by an older dora-jax): "
                      "restored without verifying it.", step, self.directory)
    else:
      problem = _differing_arrays(record["arrays"], array_record(restored["state"]))
      if problem:
        raise self._damaged(step, problem)
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
      except CheckpointDamagedError as e:
        error = e
      if not _all_processes(error is None):
        damaged.append((step, error or self._damaged(step, "unreadable on another process")))
        continue
      for bad_step, bad_error in damaged:
        moved = self._move_aside(bad_step)
        logging.warning("%s. Moved it to %s; resuming from step %d.", bad_error, moved, step)
      logging.info("Resuming from %s/%d", self.directory, step)
      return restored
    if damaged:
      older = f" (and {len(damaged) - 1} older damaged)" if len(damaged) > 1 else ""
      raise CheckpointDamagedError(
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

  def _failure(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    self._save_failed = True
    complete = [s for s in self._manager.all_steps() if s != step]
    last = (f"the last complete checkpoint is step {max(complete)}" if complete
            else "no checkpoint is complete yet")
    if _is_disk_full(error):
      return CheckpointSaveError(
          f"saving checkpoint {step} to {self.directory} failed: No space left on device; "
          f"{last}. Free some space and run the same command again to resume.")
    return CheckpointSaveError(
        f"saving checkpoint {step} to {self.directory} failed: {_first_line(error)}; {last}.")

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices.

    Raises:
      CheckpointSaveError: this save, or the previous one still in flight, failed.
    """
    self.wait_until_finished()  # A failure of the previous save is reported as that step's.
    # The checksums are computed from the very arrays handed to orbax, before the next step
    # (which donates them) runs; orbax finalises the step only once the record is written too.
    record = {"arrays": array_record(state)}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
          checksums=ChecksumsSave(record)), force=True, custom_metadata={_CHECKSUMS_MARK: True})
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


class Preemption:
  """SIGTERM (a preempted VM, `scancel`) or Ctrl-C asks the loop to save and stop.

  Both are handled at a step boundary, so that the signal never lands inside a save (an orbax
  save cut by a KeyboardInterrupt could leave its commit thread waited on forever); after a
  Ctrl-C the loop saves, closes everything and raises KeyboardInterrupt (exit 130). A second
  Ctrl-C stops at once. With several processes jax's preemption service, which handles SIGTERM
  itself, makes the hosts agree on the step at which all of them save; Ctrl-C keeps Python's
  default there.
  """

  def __init__(self, checkpointer: Checkpointer):
    self._checkpointer = checkpointer
    self._requested = False
    self.interrupted = False  # Ctrl-C asked for the stop.
    self._previous = {}
    if jax.process_count() == 1:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def _handle_interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      raise KeyboardInterrupt
    self.interrupted = self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._requested
    return self._checkpointer.reached_preemption(step)

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _add_small_items(registry: ocp.handlers.DefaultCheckpointHandlerRegistry) -> None:
  data_handler = DataStateHandler()
  registry.add("data", DataStateSave, data_handler)
  registry.add("data", DataStateRestore, data_handler)
  checksums_handler = ChecksumsHandler()
  registry.add("checksums", ChecksumsSave, checksums_handler)
  registry.add("checksums", ChecksumsRestore, checksums_handler)


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
  return ChecksumsHandler().restore(step_dir / "checksums")


def _orbax_shapes(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The array shapes orbax's metadata of `step` lists; None if it is missing or unreadable."""
  try:
    # Without its metadata orbax warns that it cannot restore "state": we say it better.
    with _absl_quiet("could not be restored"):
      metadata = manager.item_metadata(step)["state"]
  except Exception:  # pylint: disable=broad-except
    return None
  if metadata is None:
    return None
  shapes = flat_shapes(metadata.tree if hasattr(metadata, "tree") else metadata)
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


def open_read_only(checkpoint_dir: str) -> ocp.CheckpointManager:
  """A CheckpointManager that reads (never writes) the checkpoints of a run, for `load_backbone`.

  `state` restores through PyTreeRestore (a part of the state, e.g. only the teacher).
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  _add_small_items(registry)
  with _absl_quiet("Given directory is read only"):  # That is what we ask for.
    return ocp.CheckpointManager(
        checkpoint_dir, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0),
        handler_registry=registry)


def verify_step(checkpoint_dir: str, step: int, part: str | None = None) -> None:
  """Checks checkpoint `step` (its `part` of the state, e.g. 'teacher', or all of it) for damage.

  Reads the arrays on one device and compares them with the checksums saved with them.

  Raises:
    CheckpointDamagedError: a file is missing or unreadable, or an array differs from its
      checksum (one line: the step and what is wrong).
  """
  manager = open_read_only(checkpoint_dir)
  damaged = lambda what: CheckpointDamagedError(
      f"checkpoint {step} in {checkpoint_dir} is damaged: {what}")
  try:
    try:
      record = _read_record(manager, step)
    except _DamagedFile as e:
      raise damaged(str(e)) from None
    saved = _orbax_shapes(manager, step)
    if saved is None:
      raise damaged("state/_METADATA is missing or unreadable")
    if record is None:
      logging.warning("Checkpoint %d in %s has no checksums (written by an older dora-jax): "
                      "not verified.", step, checkpoint_dir)
      return
    if saved != _record_shapes(record):
      raise damaged(f"state/_METADATA disagrees with {CHECKSUMS_FILE}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {}
    for path, entry in record["arrays"].items():
      names = path.split("/")
      if part is None or names[0] == part:
        node = abstract
        for name in names[:-1]:
          node = node.setdefault(name, {})
        node[names[-1]] = jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]),
                                               sharding=device)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise damaged(f"cannot read it ({_first_line(e)})") from e
    problem = _differing_arrays(record["arrays"], array_record(restored))
    if problem:
      raise damaged(problem)
  finally:
    manager.close()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Keeps the config of a run beside its checkpoints (read back by `load_backbone`)."""
  paths.write_text(paths.join(workdir, CONFIG_FILE),
                   config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (`write_config`)."""
  return ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(workdir, CONFIG_FILE))))
