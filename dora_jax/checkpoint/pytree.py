"""A lone pytree of arrays in a folder (orbax): an exported backbone's parameters, a readout.

Unlike a run's checkpoints these have no steps, no checksums and no data position: one
`save_pytree`, one `restore_pytree`, and `saved_shapes` to compare a folder with a model before
reading it.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def shapes_of(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'path/of/array': shape} of `tree` (arrays, ShapeDtypeStructs or orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def save_pytree(directory: str, tree: Any, *, overwrite: bool = False) -> None:
  """Writes `tree` (nested dicts of arrays) to the local folder `directory`, and waits for it.

  `overwrite` replaces an existing folder; otherwise it must not exist.
  """
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(directory), tree, force=overwrite)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def saved_shapes(directory: str) -> dict[str, tuple[int, ...]]:
  """{'path/of/array': shape} of the pytree saved in `directory` (read from its metadata)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    return shapes_of(checkpointer.metadata(os.path.abspath(directory)).item_metadata)
  finally:
    checkpointer.close()


def restore_pytree(directory: str, target: Any) -> Any:
  """The pytree saved in `directory`, read into `target` (jax.ShapeDtypeStructs with shardings)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.abspath(directory), target)
  finally:
    checkpointer.close()
