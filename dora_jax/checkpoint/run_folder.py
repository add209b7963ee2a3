"""The run folder's layout: where its checkpoints and its config file are, and how to find them.

  WORKDIR/config.json            the config a dora-train run was started with
  WORKDIR/finetune_config.json   the config of a dora-finetune run (no dora-train run: no
                                 config.json, so `load_backbone` never takes it for one)
  WORKDIR/checkpoints/STEP/      one checkpoint (`manager.Checkpointer`)
  WORKDIR/dora.lock              the live run's lock (`lock.WorkdirLock`)
"""
import json
import os

import ml_collections

from dora_jax import paths

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
FINETUNE_CONFIG_FILE = "finetune_config.json"


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints."""
  return paths.join(workdir, CHECKPOINT_DIR)


def write_config(workdir: str, config: ml_collections.ConfigDict, *,
                 file: str = CONFIG_FILE) -> None:
  """Keeps the config of a run in its folder (`CONFIG_FILE`: dora-train, read back by
  `load_backbone`; `FINETUNE_CONFIG_FILE`: dora-finetune)."""
  paths.makedirs(workdir)
  paths.write_text(paths.join(workdir, file),
                   config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def read_config(workdir: str, *, file: str = CONFIG_FILE) -> ml_collections.ConfigDict:
  """The config a run was started with (`write_config`)."""
  return ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(workdir, file))))


def resolve_run(path: str) -> tuple[str, str, int | None]:
  """(workdir, checkpoint dir, step or None for the latest) of a dora-train work folder or of
  one of its checkpoints/STEP folders.

  Raises:
    FileNotFoundError: `path` is neither (one line saying what to pass).
  """
  path = paths.absolute(os.fspath(path)).rstrip("/")
  if paths.exists(paths.join(path, CONFIG_FILE)):
    return path, checkpoint_dir(path), None
  parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
  grandparent = parent.rsplit("/", 1)[0] if "/" in parent else ""
  if (name.isdigit() and parent.rsplit("/", 1)[-1] == CHECKPOINT_DIR
      and paths.exists(paths.join(grandparent, CONFIG_FILE))):
    return grandparent, parent, int(name)
  raise FileNotFoundError(
      f"{path} is not a dora-train work folder (no {CONFIG_FILE}) nor one of its "
      f"{CHECKPOINT_DIR}/STEP folders: pass the --workdir of a training run.")
