"""The small JSON items of a checkpoint beside its arrays, and the data iterator's position.

A checkpoint step holds three orbax items: `state` (the arrays), `data` (this module: each
process's input-iterator position, one JSON file per process) and `checksums` (`checksums.py`).
"""
import dataclasses
import json
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from dora_jax.checkpoint import errors


def read_json(path: epath.Path) -> Any:
  """The JSON value of a checkpoint file; `errors.DamagedFileError` when missing or garbled."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise errors.DamagedFileError(f"{path.parent.name}/{path.name} is missing") from None
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError.
    raise errors.DamagedFileError(
        f"{path.parent.name}/{path.name} is not valid JSON ({errors.first_line(e)})") from None


class JsonItemHandler(ocp.CheckpointHandler):
  """A small JSON item: no metadata, nothing to finalise or close (subclasses save/restore)."""

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


def _data_state_file(directory: epath.Path, process_index: int, process_count: int) -> epath.Path:
  return directory / f"process_{process_index}-of-{process_count}.json"


class DataStateHandler(JsonItemHandler):
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
      if not written:
        raise errors.DamagedFileError(f"{directory.name}/{path.name} is missing")
      raise errors.CheckpointMismatchError(
          f"{path} does not exist (the checkpoint holds {written}): resume with the number of "
          f"processes that wrote it.")
    return read_json(path)


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass
