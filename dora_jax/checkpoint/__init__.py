"""The run folder: the one package that reads and writes it, and the only one that knows orbax.

  run_folder  the layout (checkpoints/, config.json, finetune_config.json), the run's config file,
              finding a run from a work folder or one of its checkpoints/STEP folders.
  manager     `Checkpointer` (save, restore with verified fallback) and `read_state`, one verified
              read of a whole state or one part of it (the teacher).
  checksums   the arrays' checksums, their file, and the comparison of shapes with a model.
  items       the small JSON items beside the arrays (the data iterator's position).
  lock        one run per work folder.
  pytree      a lone pytree in a folder (an export's parameters, a readout).
  errors      what can be wrong: mismatch, damage, a failed save.

The names callers need are here: `from dora_jax import checkpoint`, then `checkpoint.NAME`.
"""
from dora_jax.checkpoint.errors import CheckpointDamagedError
from dora_jax.checkpoint.errors import CheckpointMismatchError
from dora_jax.checkpoint.errors import CheckpointSaveError
from dora_jax.checkpoint.lock import WorkdirLockedError
from dora_jax.checkpoint.lock import run_lock
from dora_jax.checkpoint.manager import Checkpointer
from dora_jax.checkpoint.manager import read_state
from dora_jax.checkpoint.manager import state_metadata
from dora_jax.checkpoint.pytree import restore_pytree
from dora_jax.checkpoint.pytree import save_pytree
from dora_jax.checkpoint.pytree import saved_shapes
from dora_jax.checkpoint.pytree import shapes_of
from dora_jax.checkpoint.run_folder import CHECKPOINT_DIR
from dora_jax.checkpoint.run_folder import CONFIG_FILE
from dora_jax.checkpoint.run_folder import FINETUNE_CONFIG_FILE
from dora_jax.checkpoint.run_folder import checkpoint_dir
from dora_jax.checkpoint.run_folder import read_config
from dora_jax.checkpoint.run_folder import resolve_run
from dora_jax.checkpoint.run_folder import write_config

__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "FINETUNE_CONFIG_FILE", "CheckpointDamagedError",
    "CheckpointMismatchError", "CheckpointSaveError", "Checkpointer", "WorkdirLockedError",
    "checkpoint_dir", "read_config", "read_state", "resolve_run", "restore_pytree", "run_lock",
    "save_pytree", "saved_shapes", "shapes_of", "state_metadata", "write_config",
]
