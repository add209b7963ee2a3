"""PyTorch `.pth` files of DINO/DoRA backbones: read them safely, pick the backbone, write one.

The public files come in two shapes:
  a bare backbone state dict   {"cls_token": tensor, "pos_embed": ..., "blocks.0.norm1.weight": ...}
  a training checkpoint        {"student": {...}, "teacher": {...}, "optimizer": {...},
                                "epoch": 100, "args": argparse.Namespace(...), "dino_loss": {...}}
where the student's and teacher's names carry `module.` / `backbone.` / `head.` prefixes.

`load_pth` reads with `torch.load(weights_only=True)`, allowing `argparse.Namespace` and nothing
else beyond tensors and plain containers, so no code in the file runs. `backbone_state_dict`
picks the backbone out of what was read; it takes any mapping of arrays (numpy arrays or torch
tensors) and needs no torch, so the selection rules are testable without it.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from typing import Any, Mapping

import numpy as np

DEFAULT_KEY = "teacher"  # DINO's eval_linear.py default `--checkpoint_key`: the EMA teacher.
INSTALL_HINT = "pip install -e '.[torch]'"


class TorchCheckpointError(ValueError):
  """A `.pth` file cannot be read or does not hold the backbone asked for (one line)."""


def import_torch(purpose: str):
  """The torch module, or a TorchCheckpointError saying how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TorchCheckpointError(f"{purpose} needs PyTorch, which is not installed: "
                               f"{INSTALL_HINT} (a CPU build is enough).") from None
  return torch


def load_pth(file: str) -> Any:
  """The object in a `.pth` file, read without unpickling anything but tensors and containers.

  `argparse.Namespace` (the `args` of DINO/DoRA training checkpoints) is the one class allowed.

  Raises:
    TorchCheckpointError: the file is missing, is not a PyTorch file, or pickles other objects.
  """
  if not os.path.isfile(file):
    raise TorchCheckpointError(f"{file} does not exist (or is not a file).")
  torch = import_torch(f"reading {file}")
  try:
    with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
      warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": said below if fatal.
      return torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    blocked = re.search(r"GLOBAL (\S+)", str(e))
    if blocked:
      raise TorchCheckpointError(
          f"{file} pickles {blocked.group(1)}, which only an unsafe full unpickling would load; "
          "dora-export reads tensors, plain containers and argparse.Namespace only.") from None
    raise TorchCheckpointError(f"{file} is not a PyTorch checkpoint (torch.load cannot read it "
                               "as tensors and containers).") from None
  except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TorchCheckpointError(
        f"{file} is not a PyTorch checkpoint (torch.load: {reason}).") from None


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def is_state_dict(value: Any) -> bool:
  """A non-empty mapping from names to arrays (tensors or numpy)."""
  return (isinstance(value, Mapping) and bool(value)
          and all(isinstance(k, str) and _is_array(v) for k, v in value.items()))


def as_numpy(value: Any) -> np.ndarray:
  """A CPU torch tensor (any float dtype, bfloat16 included) or array -> numpy float32."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if not value.is_floating_point() or value.dtype.itemsize < 4:
      value = value.float()  # numpy has no bfloat16; float16 is widened the same way.
    value = value.numpy()
  return np.asarray(value, np.float32)


def _names(keys) -> str:
  shown = [repr(k) for k in list(keys)[:12]]
  more = len(keys) - len(shown)
  return "[" + ", ".join(shown) + (f", ... {more} more" if more > 0 else "") + "]"


def backbone_state_dict(checkpoint: Any, key: str | None = None, *,
                        file: str = "the checkpoint") -> tuple[dict[str, np.ndarray], str | None]:
  """The backbone's weights in a loaded `.pth` object, as float32 numpy arrays.

  Args:
    checkpoint: what `load_pth` returned: a bare state dict or a training checkpoint (a dict
      whose `student` / `teacher` entries are state dicts).
    key: the entry of a training checkpoint to use; None takes `teacher` (DINO's and DoRA's
      evaluated encoder). Must be None for a bare state dict.
    file: the file's name, for messages.

  Returns:
    (name -> array, the key used or None). Names keep their prefixes (`module.`, `backbone.`)
    and the DINO head's `head.*` entries: `vit.from_torch_state_dict` strips and skips them.

  Raises:
    TorchCheckpointError: naming the keys that are there when `key` is not, or saying what the
      file holds when it is neither shape.
  """
  if not isinstance(checkpoint, Mapping):
    raise TorchCheckpointError(
        f"{file} holds a {type(checkpoint).__name__}, not a state dict nor a training checkpoint "
        "(a dict of state dicts such as 'teacher').")
  if is_state_dict(checkpoint):
    if key is not None:
      raise TorchCheckpointError(
          f"{file} is a bare state dict (names such as {_names(list(checkpoint)[:3])}): it has no "
          f"entry {key!r}; leave out --key.")
    return {name: as_numpy(value) for name, value in checkpoint.items()}, None
  keys = list(checkpoint)
  model_keys = [k for k in keys if is_state_dict(checkpoint[k])]
  if key is None:
    if DEFAULT_KEY not in checkpoint:
      raise TorchCheckpointError(
          f"{file} has no {DEFAULT_KEY!r} entry; pass --key with one of its state dicts "
          f"{_names(model_keys)} (its keys are {_names(keys)}).")
    key = DEFAULT_KEY
  if key not in checkpoint:
    raise TorchCheckpointError(f"{file} has no key {key!r}; its keys are {_names(keys)}.")
  if not is_state_dict(checkpoint[key]):
    raise TorchCheckpointError(
        f"{file}[{key!r}] is a {type(checkpoint[key]).__name__}, not a state dict of tensors; "
        f"the state dicts in {file} are {_names(model_keys)}.")
  return {name: as_numpy(value) for name, value in checkpoint[key].items()}, key


def save_pth(state_dict: Mapping[str, np.ndarray], file: str) -> None:
  """Writes name -> array as a PyTorch state dict of CPU tensors (`torch.save`) to `file`."""
  torch = import_torch(f"writing {file}")
  # Copies: arrays fetched from jax are read-only, which torch tensors must not share.
  tensors = {name: torch.from_numpy(np.array(value, np.float32, order="C"))
             for name, value in state_dict.items()}
  torch.save(tensors, file)
