"""The mesh and the shardings of the batch and the state (four fake CPU devices)."""
import jax
import ml_collections
import numpy as np
import pytest

from dora_jax.trainer import sharding


def _mesh_config(data=-1, fsdp=1):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


# ---- Mesh and shardings (4 fake CPU devices, see conftest.py). ----


def test_mesh_resolves_data_axis_and_is_auto():
  assert jax.device_count() == 4
  mesh = sharding.make_mesh(_mesh_config(-1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(_mesh_config()).shape) == {"data": 4, "fsdp": 1}


@pytest.mark.parametrize("data,fsdp,key", [(-1, 3, "mesh.fsdp=3"), (3, 1, "mesh.data=3"),
                                           (2, 1, "mesh.data=2")])
def test_mesh_errors_name_the_key(data, fsdp, key):
  with pytest.raises(ValueError, match=key):
    sharding.make_mesh(_mesh_config(data, fsdp))


def test_fsdp_spec_picks_largest_divisible_dim():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((384, 1536), 2) == P(None, "fsdp")
  assert sharding.fsdp_spec((1537, 384), 2) == P(None, "fsdp")  # 1537 is odd.
  assert sharding.fsdp_spec((1537, 385), 2) == P()  # Nothing divides: replicated.
  assert sharding.fsdp_spec((384,), 2) == P()  # Small: replicated.
  assert sharding.fsdp_spec((384, 1536), 1) == P()  # No fsdp axis.


def test_batch_is_split_over_all_devices_in_order():
  mesh = sharding.make_mesh(_mesh_config(-1, 2))
  local = {"frames": np.arange(8 * 3, dtype=np.uint8).reshape(8, 3)}
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
  frames = batch["frames"]
  assert frames.shape == (8, 3)
  np.testing.assert_array_equal(np.asarray(frames), local["frames"])
  starts = sorted(shard.index[0].start for shard in frames.addressable_shards)
  assert starts == [0, 2, 4, 6]  # Two clips per device, no device repeats another.
  assert all(shard.data.shape == (2, 3) for shard in frames.addressable_shards)


def test_fsdp_state_is_sharded_and_computes_the_same():
  mesh = sharding.make_mesh(_mesh_config(-1, 2))
  rng = np.random.default_rng(0)
  state = {"kernel": rng.normal(size=(256, 128)).astype(np.float32),
           "bias": rng.normal(size=(128,)).astype(np.float32)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  shardings = sharding.state_shardings(abstract, mesh)
  assert shardings["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert shardings["bias"].spec == jax.sharding.PartitionSpec()
  placed = jax.device_put(state, shardings)
  assert placed["kernel"].addressable_shards[0].data.shape == (128, 128)
  x = rng.normal(size=(8, 256)).astype(np.float32)
  xs = sharding.global_batch({"x": x}, sharding.batch_sharding(mesh))["x"]
  out = jax.jit(lambda s, x: x @ s["kernel"] + s["bias"],
                out_shardings=sharding.replicated(mesh))(placed, xs)
  expected = x.astype(np.float64) @ state["kernel"].astype(np.float64) + state["bias"]
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
