"""PyTorch weight names of DINO/DoRA <-> the NNX parameter paths of our models.

Pure name and layout mapping, no model classes: `vit.from_torch_state_dict` and
`head.head_from_torch_state_dict` (and their inverses) use it. Our parameter paths mirror the
PyTorch names (`blocks[i].attn.qkv.kernel` <-> `blocks.i.attn.qkv.weight`), so a mapping is a
renaming plus a transpose of the kernels.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# Prefixes of a backbone's weights in DINO/DoRA checkpoints (DDP wrapper, MultiCropWrapper).
BACKBONE_PREFIXES = ("module.", "backbone.")
HEAD_PREFIXES = ("module.", "head.")
# The head's weight-norm gain and direction under the old (`weight_g`, `weight_v`) and the
# torch.nn.utils.parametrizations (`original0`, `original1`) names.
HEAD_GAIN_NAMES = ("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
HEAD_DIRECTION_NAMES = ("last_layer.weight_v", "last_layer.parametrizations.weight.original1")


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  """A nested dict -> {path tuple: leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  """The inverse of `flatten`."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
  """Removes leading `prefixes` (in any order, repeated) from every name.

  Raises:
    ValueError: two names become the same (e.g. a whole checkpoint with student and teacher).
  """
  pattern = re.compile("^(?:" + "|".join(re.escape(p) for p in prefixes) + ")+")
  out: dict[str, Any] = {}
  for name, value in state_dict.items():
    short = pattern.sub("", name)
    if short in out:
      raise ValueError(
          f"state_dict has two entries for {short!r} once prefixes {prefixes} are removed "
          f"(one is {name!r}); pass one model's weights (e.g. checkpoint['teacher']).")
    out[short] = value
  return out


# ---- The ViT. ----


def torch_name(path: tuple) -> str:
  """NNX path -> PyTorch name, e.g. ('blocks', 0, 'norm1', 'scale') -> 'blocks.0.norm1.weight'."""
  parts = [str(key) for key in path]
  if parts[0] == "patch_embed":
    parts.insert(1, "proj")
  if parts[-1] in ("kernel", "scale"):
    parts[-1] = "weight"
  return ".".join(parts)


def torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of the parameter at `path` whose NNX shape is `shape`."""
  if path[-1] == "kernel":
    return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  """Linear kernels (in, out) -> (out, in); conv kernels (p, p, 3, D) -> (D, 3, p, p)."""
  if path[-1] == "kernel":
    return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
  return value


def from_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  """The inverse of `to_torch_layout`."""
  if path[-1] == "kernel":
    return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  return value


# ---- The DINO head. ----


def head_linear_names(num_layers: int) -> list[str]:
  """PyTorch names of the head's MLP layers.

  nn.Sequential(Linear, GELU, Linear, GELU, Linear): Linear i sits at index 2 i; a one-layer
  head is a bare nn.Linear called `mlp`.
  """
  return ["mlp"] if num_layers == 1 else [f"mlp.{2 * i}" for i in range(num_layers)]
