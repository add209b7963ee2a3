"""What can be wrong with a run folder's checkpoints, each as its own error.

  CheckpointMismatchError  a checkpoint of another model (or process count) than the one asked for
  CheckpointDamagedError   a file missing, unreadable, or an array differing from its checksum
  CheckpointSaveError      a save failed (e.g. a full disk); older checkpoints are intact
  DamagedFileError         one file of a checkpoint is wrong; the reader adds the step
"""
import errno


class CheckpointMismatchError(ValueError):
  """A checkpoint in the work folder does not fit the model of the current config."""


class CheckpointDamagedError(ValueError):
  """A checkpoint's files are missing, unreadable or differ from the checksums saved with them."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full); older checkpoints are intact."""


class DamagedFileError(Exception):
  """What is wrong with one file of a checkpoint; the caller names the step."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of the innermost error behind `error` (orbax wraps tensorstore's)."""
  while not isinstance(error, DamagedFileError) and (error.__cause__ or error.__context__):
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  line = lines[0].strip() if lines else type(error).__name__
  return line if len(line) <= limit else line[:limit - 3] + "..."


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error behind it, is ENOSPC."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False
