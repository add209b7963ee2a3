"""Checkpointer on a toy state: keep-n, bitwise restore, shape checks."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dora_jax import checkpoints
from dora_jax import sharding


def _mesh_config(data=-1, fsdp=1):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def _toy_state(seed=0, width=3):
  rng = np.random.default_rng(seed)
  return {
      "step": jnp.int32(seed),
      "student": {"kernel": jnp.asarray(rng.normal(size=(4, width)), jnp.float32)},
      "opt_state": (jnp.asarray(rng.normal(size=(4, width)), jnp.float32),),
      "rng": jax.random.key_data(jax.random.key(seed)),
  }


def _abstract(state, mesh):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))


def test_checkpointer_keeps_last_and_restores_bitwise(tmp_path):
  mesh = sharding.make_mesh(_mesh_config())
  manager = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  states = {step: _toy_state(step) for step in (1, 2, 3)}
  for step, state in states.items():
    manager.save(step, state, {"position": step, "epoch": 0})
  manager.wait_until_finished()
  assert sorted(int(n) for n in os.listdir(tmp_path / "ckpt") if n.isdigit()) == [2, 3]
  assert "process_0-of-1.json" in os.listdir(tmp_path / "ckpt" / "3" / "data")
  restored, data_state = manager.restore(3, _abstract(states[3], mesh))
  manager.close()
  assert data_state == {"position": 3, "epoch": 0}
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states[3])):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert restored["student"]["kernel"].sharding == sharding.replicated(mesh)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
  mesh = sharding.make_mesh(_mesh_config())
  manager = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  manager.save(5, _toy_state(5, width=3), {})
  manager.wait_until_finished()
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"different model: student/kernel has shape \(4, 3\) in the "
                           r"checkpoint but \(4, 6\)"):
    manager.restore(5, _abstract(_toy_state(0, width=6), mesh))
  manager.close()


def test_describe_mismatch_reports_missing_and_extra():
  assert checkpoints.describe_mismatch({"a": (1,)}, {"a": (1,)}) is None
  assert "not in the checkpoint (e.g. b)" in checkpoints.describe_mismatch(
      {"a": (1,)}, {"a": (1,), "b": (2,)})
  assert "this config does not (e.g. c)" in checkpoints.describe_mismatch(
      {"a": (1,), "c": (2,)}, {"a": (1,)})
