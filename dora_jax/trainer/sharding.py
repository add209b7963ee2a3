"""The device mesh and the NamedShardings of the batch and of the train state.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both of them (every device sees
different clips). The state is replicated unless `MeshPlan.fsdp > 1`: then every large array of
the state (parameters of student and teacher, and the optimizer moments, which have the same
shapes) is split over 'fsdp' along its largest dimension that divides evenly, as in big_vision's
FSDP rule. XLA inserts the all-gathers and reduce-scatters this implies.
"""
import dataclasses
from typing import Any, Sequence

import jax
from jax.experimental import mesh_utils
import ml_collections
import numpy as np

MESH_AXES = ("data", "fsdp")
# The default of config.mesh.fsdp_min_size: splitting biases and norms would cost a collective
# each for no memory saving.
FSDP_MIN_SIZE = 2**14


@dataclasses.dataclass(frozen=True)
class MeshPlan:
  """`config.mesh` parsed once: the devices asked for on each axis, and the FSDP threshold.

  Attributes:
    data: devices on the 'data' axis; -1: all that `fsdp` leaves.
    fsdp: devices that shard parameters and optimizer state.
    fsdp_min_size: arrays with fewer elements stay replicated.
  """
  data: int = -1
  fsdp: int = 1
  fsdp_min_size: int = FSDP_MIN_SIZE

  @classmethod
  def from_config(cls, mesh_config: ml_collections.ConfigDict) -> "MeshPlan":
    return cls(data=int(mesh_config.data), fsdp=int(mesh_config.fsdp),
               fsdp_min_size=int(mesh_config.get("fsdp_min_size", FSDP_MIN_SIZE)))

  def shape(self, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) over `num_devices`, `data` -1 resolved.

    Raises:
      ValueError: naming the key when the product does not equal the number of devices.
    """
    fsdp, data = self.fsdp, self.data
    if fsdp < 1:
      raise ValueError(f"config mesh.fsdp={fsdp}: must be at least 1.")
    if data == -1:
      if num_devices % fsdp:
        raise ValueError(
            f"config mesh.fsdp={fsdp} does not divide the {num_devices} devices; "
            f"choose a divisor of {num_devices}.")
      data = num_devices // fsdp
    if data < 1 or data * fsdp != num_devices:
      raise ValueError(
          f"config mesh.data={self.data} x mesh.fsdp={fsdp} must equal the number of "
          f"devices ({num_devices}); set mesh.data=-1 to use all of them.")
    return data, fsdp

  def make(self, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all, of all processes), Auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = self.shape(len(devices))
    try:
      # Orders devices by the physical interconnect (TPU torus), fsdp innermost.
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """`MeshPlan.make` of a `config.mesh`."""
  return MeshPlan.from_config(mesh_config).make(devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (clip) dimension over both axes; the other dimensions whole."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MESH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def fsdp_spec(shape: Sequence[int], fsdp: int,
              min_size: int = FSDP_MIN_SIZE) -> jax.sharding.PartitionSpec:
  """The spec of one state array: its largest dim divisible by `fsdp` on 'fsdp', else replicated."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return jax.sharding.PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return jax.sharding.PartitionSpec(*spec)
  return jax.sharding.PartitionSpec()


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh,
                    min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every leaf of `abstract_state` (a pytree of jax.ShapeDtypeStruct).

  Parameters and their optimizer moments have the same shapes, hence the same sharding.
  """
  fsdp = mesh.shape["fsdp"]

  def leaf_sharding(leaf):
    return jax.sharding.NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, min_size))

  return jax.tree.map(leaf_sharding, abstract_state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their target sharding (what orbax restores into)."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, shardings)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This host's part of the batch (B / process_count clips) -> global arrays of B clips."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
