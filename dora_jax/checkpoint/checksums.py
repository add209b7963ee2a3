"""The checksums of a checkpoint's arrays, their file, and the comparison of shapes.

`array_record` computes, on the device, a checksum of every array orbax saves; the same whatever
the array's sharding, so a checkpoint restored onto another mesh still verifies. The record is
a small orbax item of its own (checkpoints/STEP/checksums/array_checksums.json), written with
the state; a restore compares the arrays it read with it (`differing_arrays`). `flat_shapes` and
`describe_mismatch` compare a checkpoint with a model.
"""
import dataclasses
import json
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dora_jax.checkpoint import errors
from dora_jax.checkpoint import items

CHECKSUMS_FILE = "array_checksums.json"


# ---- Checksums of the saved arrays: a small JSON item beside `state` and `data`. ----


class ChecksumsHandler(items.JsonItemHandler):
  """Writes (process 0) and reads the record of `array_record`."""

  def save(self, directory: epath.Path, args: "ChecksumsSave") -> None:
    if jax.process_index() == 0:  # The record is the same on every process.
      directory.mkdir(parents=True, exist_ok=True)
      arrays = ",\n".join(f"  {json.dumps(path)}: {json.dumps(entry, sort_keys=True)}"
                          for path, entry in sorted(args.record["arrays"].items()))
      (directory / CHECKSUMS_FILE).write_text(f'{{"arrays": {{\n{arrays}\n}}}}\n')

  def restore(self, directory: epath.Path, args: "ChecksumsRestore | None" = None) -> dict:
    record = items.read_json(directory / CHECKSUMS_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
      raise errors.DamagedFileError(f"{directory.name}/{CHECKSUMS_FILE} holds no array checksums")
    return record


@ocp.args.register_with_handler(ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class ChecksumsSave(ocp.args.CheckpointArgs):
  record: dict


@ocp.args.register_with_handler(ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumsRestore(ocp.args.CheckpointArgs):
  pass


# Two independent 32-bit lanes (seeds: digits of pi): damage goes unnoticed with odds ~2^-64.
_CHECKSUM_SEEDS = (0x243F6A88, 0x85A308D3)


def _mix32(x: jax.Array) -> jax.Array:
  """murmur3's finaliser: a bijection of uint32 in which each input bit flips ~half the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32: same shape for dtypes of up to 32 bits, (..., 2) for 64 bits."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = 8 * x.dtype.itemsize
  if bits > 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
  """(2,) uint32: sums over the elements of mix(bits + mix(flat position, seed)), mod 2^32.

  A sum is independent of how the array is sharded (each device adds its part, then the parts
  are added), so the checksum is computed where the arrays are, with no host copy, and a
  checkpoint restored onto another mesh still verifies. Mixing each element's bits with its
  position makes flipped bits, zeroed blocks and moved elements change the sum.
  """
  words = _words(x)
  position = jnp.zeros(words.shape, jnp.uint32)
  for axis, size in enumerate(words.shape):  # Flat position, without reshaping a sharded array.
    position = position * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
  return jnp.stack([
      jnp.sum(_mix32(words + _mix32(position ^ jnp.uint32(seed))), dtype=jnp.uint32)
      for seed in _CHECKSUM_SEEDS])


# One program per array shape (and sharding): a ViT's blocks, and the student, teacher and
# optimizer moments, share them, so a state of hundreds of arrays compiles a few dozen.
_leaf_checksum = jax.jit(_array_checksum)


def array_record(tree: Any) -> dict[str, dict]:
  """{'path/of/array': {'shape', 'dtype', 'checksum'}} for every array of `tree`.

  Computed where the arrays live (any sharding, several hosts); the result is the same on every
  process. Paths are those of `flat_shapes`.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  # One array at a time: the checksums of sharded arrays end in all-reduces, and many of those
  # in flight at once can starve the CPU backend's collective threads (a hang, then abort).
  sums = [jax.device_get(_leaf_checksum(leaf)) for _, leaf in leaves]
  return {"/".join(_key_name(entry) for entry in path): {
      "shape": list(leaf.shape), "dtype": str(leaf.dtype),
      "checksum": "".join(f"{int(word):08x}" for word in np.asarray(checksum))}
          for (path, leaf), checksum in zip(leaves, sums)}


def differing_arrays(saved: dict[str, dict], restored: dict[str, dict]) -> str | None:
  """A one-line description of restored arrays that differ from the saved record, or None."""
  differing = sorted(path for path, entry in restored.items()
                     if saved.get(path, {}).get("checksum") != entry["checksum"])
  if not differing:
    return None
  return (f"{len(differing)} of its {len(restored)} arrays differ from the checksums saved "
          f"with them (e.g. {differing[0]})")


# ---- Shape checks. ----


def _key_name(entry: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'student/backbone/.../kernel' -> shape, for arrays, ShapeDtypeStructs or orbax metadata.

  Path entries are reduced to their names, so that a restored tree (plain dicts) and the live one
  (nnx.State, optax named tuples) give the same paths.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(entry) for entry in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def record_shapes(record: dict) -> dict[str, tuple[int, ...]]:
  """The shapes a checksum record lists, as `flat_shapes` gives them."""
  return {path: tuple(entry["shape"]) for path, entry in record["arrays"].items()}


def describe_mismatch(saved: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]]) -> str | None:
  """A one-line description of how two flat shape dicts differ, or None when they agree."""
  # The student's parameters first: they name the layer a user would recognise.
  for path in sorted(expected, key=lambda p: (not p.startswith("student"), p)):
    if path in saved and saved[path] != expected[path]:
      return f"{path} has shape {saved[path]} in the checkpoint but {expected[path]} in this config"
  missing = sorted(set(expected) - set(saved))
  if missing:
    return f"{len(missing)} arrays of this config are not in the checkpoint (e.g. {missing[0]})"
  extra = sorted(set(saved) - set(expected))
  if extra:
    return f"the checkpoint has {len(extra)} arrays this config does not (e.g. {extra[0]})"
  return None
