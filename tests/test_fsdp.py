"""FSDP: the train step on ('data', 'fsdp') meshes of 4 fake CPU devices equals data parallelism.

Parameters and optimizer moments at or above `mesh.fsdp_min_size` elements are split over 'fsdp'
(checked on the arrays' shardings), and several steps make the updates (state after - state
before) of `fsdp=1` to 1% of each array's update norm (the collectives sum in another order),
also after a checkpoint written on one mesh is restored onto another. The learning rate is large
enough that an update is far above the float32 rounding of the parameters it moves.
"""
import jax
import ml_collections
import numpy as np
import pytest

from conftest import make_tiny_config
from dora_jax import checkpoint
from dora_jax.trainer import sharding
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules
from dora_jax.trainer import step as train_step

STEPS_PER_EPOCH, TOTAL_STEPS, MIN_SIZE = 10, 100, 1024
# Peak lr 0.05 * 4 / 256 ~ 8e-4: three Adam steps move each parameter by ~2e-3.
BASE_LR = 0.05


def _batches(config, count):
  rng = np.random.default_rng(0)
  size, local = config.data.global_size, config.data.local_size
  shape = (config.batch_size, config.data.frames_per_clip)
  return [{"frames": rng.integers(0, 256, shape + (size, size, 3), dtype=np.uint8),
           "crops": rng.integers(0, 256, shape + (config.data.num_local_crops, local, local, 3),
                                 dtype=np.uint8)} for _ in range(count)]


@pytest.fixture(scope="module")
def setup():
  config = make_tiny_config(**{"optim.warmup_epochs": 0, "optim.freeze_last_layer_epochs": 0,
                               "mesh.fsdp_min_size": MIN_SIZE, "optim.base_lr": BASE_LR})
  plan = plan_lib.TrainPlan.from_config(config)
  graphdef, state = train_step.init_train_state(config, plan, rng=jax.random.PRNGKey(0))
  return config, graphdef, jax.device_get(state), _batches(config, 3)


_STEPS = {}  # (data, fsdp) -> the jitted step: one compile per mesh shape.


def _run(setup, data, fsdp, start_state=None, steps=3, first_batch=0):
  """The state after `steps` steps on a (data, fsdp) mesh, and the shardings it lived in."""
  config, graphdef, initial, batches = setup
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          initial)
  shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  if (data, fsdp) not in _STEPS:
    _STEPS[(data, fsdp)] = jax.jit(
        train_step.make_train_step(config, plan_lib.TrainPlan.from_config(config), graphdef),
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)))
  step = _STEPS[(data, fsdp)]
  state = start_state if start_state is not None else jax.device_put(initial, shardings)
  schedule = schedules.make_schedules(config, steps_per_epoch=STEPS_PER_EPOCH,
                                      total_steps=TOTAL_STEPS)
  for batch in batches[first_batch:first_batch + steps]:
    state, _ = step(state, sharding.global_batch(batch, sharding.batch_sharding(mesh)),
                    schedule.at(jax.device_get(state["step"])))
  return state, shardings, mesh


@pytest.fixture(scope="module")
def data_parallel(setup):
  return jax.device_get(_run(setup, 4, 1)[0])


def _assert_same_updates(got, want, initial):
  """`got` and `want` moved every array of `initial` alike: integers equal, and each float
  array's update (after - before) within 1% of `want`'s in L2 norm. The parameters' values would
  hide a wrong update under their own float32 tolerance; the FSDP/data-parallel difference of
  the updates is ~0.3% (Adam divides near-zero gradients, such as a key bias's, by their own
  size), a 2% larger learning rate is 2-3%."""
  moved = 0
  for (path, a), b, start in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(got))[0],
                                 jax.tree.leaves(want), jax.tree.leaves(initial)):
    name = jax.tree_util.keystr(path)
    if not np.issubdtype(np.asarray(start).dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    start = np.asarray(start, np.float64)
    update_got, update_want = np.asarray(a, np.float64) - start, np.asarray(b, np.float64) - start
    size, off = np.linalg.norm(update_want), np.linalg.norm(update_got - update_want)
    assert off <= 0.01 * size + 1e-12, f"{name}: update off by {off / size:.2%}"
    moved += size > 0
  assert moved >= 20


@pytest.mark.parametrize("data,fsdp", [(2, 2), (1, 4)])
def test_fsdp_steps_equal_data_parallel_and_large_arrays_are_split(setup, data_parallel, data,
                                                                   fsdp):
  state, _, _ = _run(setup, data, fsdp)
  split = replicated = 0
  for leaf in jax.tree.leaves(state["student"]) + jax.tree.leaves(state["opt_state"]):
    if not hasattr(leaf, "sharding") or leaf.ndim == 0:
      continue
    shard_shape = leaf.addressable_shards[0].data.shape
    if leaf.size >= MIN_SIZE and any(d % fsdp == 0 for d in leaf.shape):
      assert "fsdp" in leaf.sharding.spec, (leaf.shape, leaf.sharding.spec)
      assert np.prod(shard_shape) == leaf.size // fsdp
      split += 1
    elif leaf.size < MIN_SIZE:
      assert shard_shape == leaf.shape  # Small arrays stay whole on every device.
      replicated += 1
  assert split >= 10 and replicated >= 10
  _assert_same_updates(state, data_parallel, setup[2])


def test_checkpoint_written_on_one_mesh_restores_onto_another(setup, data_parallel, tmp_path):
  state, shardings, _ = _run(setup, 2, 2, steps=2)
  manager = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  manager.save(2, state, {"position": 2})
  manager.wait_until_finished()
  # Restored onto a (1, 4) mesh, one more step there ends where data parallelism does.
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 4}))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  target = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh, MIN_SIZE))
  restored, data_state = manager.restore(2, target)
  manager.close()
  assert data_state == {"position": 2}
  kernel = restored["student"]["backbone"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.mesh.shape["fsdp"] == 4 and "fsdp" in kernel.sharding.spec
  final, _, _ = _run(setup, 1, 4, start_state=restored, steps=1, first_batch=2)
  _assert_same_updates(final, data_parallel, setup[2])
