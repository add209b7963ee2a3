"""The exported backbone folder: a ViT's parameters (orbax) and a JSON file describing the model.

    DIR/dora_backbone.json   {"format": "dora_jax.backbone", "version": 1, "variant": "S/16",
                              "dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16,
                              "img_size": 224, "source": {...where the weights came from...}}
    DIR/params/              the `VisionTransformer`'s parameters (flax.nnx pure dict),
                             written by `checkpoint.save_pytree` (orbax)

`dora-export` writes it (from a PyTorch `.pth` or from a `dora-train` run); `load_exported`, and so
`load_backbone(DIR)`, reads it back as a ready `VisionTransformer`. "variant" is the name of the
size in `vit.VARIANTS`, or null for a custom size (the four size keys always say it exactly).

This module depends on the model and the checkpoint package only (not on the trainer), so
loading an encoder stays light.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from dora_jax import checkpoint
from dora_jax.models import vit

DESCRIPTION_FILE = "dora_backbone.json"
PARAMS_DIR = "params"
FORMAT = "dora_jax.backbone"
VERSION = 1
_SIZE_KEYS = ("dim", "depth", "num_heads", "patch_size")


class ExportError(ValueError):
  """An exported folder cannot be written or read: says which file and what is wrong."""


def variant_name(size: vit.ViTSize) -> str | None:
  """The `vit.VARIANTS` name of a size ("S/16"), or None for a custom size."""
  return next((name for name, known in vit.VARIANTS.items() if known == size), None)


def describe(backbone: vit.VisionTransformer, source: dict[str, Any]) -> dict[str, Any]:
  """The JSON description of `backbone`; `source` says where its weights came from."""
  size = backbone.size
  return {
      "format": FORMAT,
      "version": VERSION,
      "variant": variant_name(size),
      **{key: int(getattr(size, key)) for key in _SIZE_KEYS},
      "img_size": int(backbone.img_size),
      "source": source,
  }


def is_exported(path: str) -> bool:
  """Whether `path` is a folder holding an exported backbone's description."""
  return os.path.isfile(os.path.join(os.fspath(path), DESCRIPTION_FILE))


def check_new_folder(out_dir: str) -> str:
  """The absolute path of `out_dir`, which must not exist yet and whose parent must be writable."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir):
    raise ExportError(f"{out_dir} already exists: remove it or choose another --out.")
  parent = os.path.dirname(out_dir)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise ExportError(f"cannot write {out_dir}: {parent} is not a writable folder.")
  return out_dir


def temporary_sibling(path: str, *, folder: bool) -> str:
  """A fresh temporary file or folder next to `path`, renamed onto it once complete."""
  parent, name = os.path.split(os.path.abspath(path))
  umask = os.umask(0)
  os.umask(umask)
  if folder:
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  else:
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    os.close(handle)
  # tempfile makes them private (0700 / 0600); the result gets the usual permissions.
  os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)
  return tmp


def write_exported(backbone: vit.VisionTransformer, directory: str,
                   source: dict[str, Any]) -> dict[str, Any]:
  """Writes `backbone` as an exported folder into `directory` (which must be empty or new).

  Callers that want an all-or-nothing result write into a temporary folder and rename it (see
  `save_exported`). Returns the description written.
  """
  description = describe(backbone, source)
  checkpoint.save_pytree(os.path.join(os.path.abspath(directory), PARAMS_DIR),
                         nnx.to_pure_dict(nnx.state(backbone)))
  with open(os.path.join(directory, DESCRIPTION_FILE), "w") as f:
    json.dump(description, f, indent=2)
    f.write("\n")
  return description


def save_exported(backbone: vit.VisionTransformer, out_dir: str,
                  source: dict[str, Any]) -> dict[str, Any]:
  """Writes the exported folder `out_dir` (new) all at once: a temporary folder, then a rename."""
  out_dir = check_new_folder(out_dir)
  tmp = temporary_sibling(out_dir, folder=True)
  try:
    description = write_exported(backbone, tmp, source)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return description


def read_description(path: str) -> dict[str, Any]:
  """The checked JSON description of the exported folder `path`."""
  file = os.path.join(os.fspath(path), DESCRIPTION_FILE)
  try:
    with open(file) as f:
      description = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read {file}: {e}") from None
  if not isinstance(description, dict) or description.get("format") != FORMAT:
    raise ExportError(f"{file} is not a dora-export description (no \"format\": \"{FORMAT}\").")
  if description.get("version") != VERSION:
    raise ExportError(f"{file} has version {description.get('version')!r}; this dora_jax reads "
                      f"version {VERSION}: export it again with this version's dora-export.")
  for key in _SIZE_KEYS + ("img_size",):
    value = description.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ExportError(f"{file}: \"{key}\" is {value!r}; expected a positive integer.")
  return description


def load_exported(path: str, *, dtype: Any = jnp.float32,
                  drop_path_rate: float = 0.0) -> vit.VisionTransformer:
  """The `VisionTransformer` of an exported folder, with its weights, on the first local device.

  Args:
    path: a folder written by `dora-export` (holds `dora_backbone.json` and `params/`).
    dtype: compute dtype of the matmuls (parameters stay float32).
    drop_path_rate: stochastic depth for fine-tuning (applied only when called with an rng).

  Raises:
    ExportError: the description is missing or malformed, or the parameters do not have the
      shapes it describes (one line, naming the first differing array).
  """
  path = os.path.abspath(os.fspath(path))
  description = read_description(path)
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise ExportError(f"{params_dir} does not exist: the export in {path} is incomplete; "
                      "export it again.")
  sizes = {key: description[key] for key in _SIZE_KEYS}
  try:
    abstract = nnx.eval_shape(lambda: vit.VisionTransformer(
        None, img_size=description["img_size"], drop_path_rate=drop_path_rate, dtype=dtype,
        rngs=nnx.Rngs(0), **sizes))
  except ValueError as e:
    raise ExportError(f"{os.path.join(path, DESCRIPTION_FILE)}: {e}") from None
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  problem = _shape_mismatch(checkpoint.saved_shapes(params_dir), checkpoint.shapes_of(target))
  if problem:
    raise ExportError(f"the parameters in {params_dir} do not match "
                      f"{DESCRIPTION_FILE}: {problem}; export it again.")
  params = checkpoint.restore_pytree(params_dir, target)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _shape_mismatch(saved: dict[str, tuple[int, ...]],
                    expected: dict[str, tuple[int, ...]]) -> str | None:
  for name in sorted(expected):
    if name not in saved:
      return f"{name} is missing"
    if saved[name] != expected[name]:
      return f"{name} has shape {saved[name]}, expected {expected[name]}"
  extra = sorted(set(saved) - set(expected))
  return f"{extra[0]} is not part of the model" if extra else None
