"""The trainer's parts on their own: mesh and shardings, checkpoints, metrics files, pictures."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from dora_jax import checkpoints
from dora_jax import metrics
from dora_jax import sharding
from dora_jax import visualize


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


# ---- Checkpoints on a toy state. ----


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
  assert manager.all_steps() == [2, 3]
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


def test_load_backbone_refuses_a_folder_that_is_not_a_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a dora-train work folder"):
    checkpoints.load_backbone(str(tmp_path))


# ---- Metrics files. ----


def test_metric_writer_jsonl_tensorboard_and_resume_truncation(tmp_path):
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir, start_step=0, total_steps=6, show_progress=False)
  for step in range(1, 6):
    writer.write_scalars(step, {"loss": np.float32(1.0 / step), "lr": 0.5})
  writer.close()
  rows = metrics.read_metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
  assert rows[1] == {"step": 2, "loss": float(np.float32(0.5)), "lr": 0.5}
  assert any(name.startswith("events.out.tfevents")
             for name in os.listdir(tmp_path / metrics.TENSORBOARD_DIR))

  # A run resumed from the checkpoint at step 3 forgets what was logged after it.
  writer = metrics.MetricWriter(workdir, start_step=3, total_steps=6, show_progress=False)
  writer.write_scalars(4, {"loss": 9.0, "lr": 0.5})
  writer.close()
  rows = metrics.read_metrics(workdir)
  assert [(row["step"], row["loss"]) for row in rows][-2:] == [(3, float(np.float32(1 / 3))),
                                                              (4, 9.0)]
  assert len(rows) == 4


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), start_step=0, total_steps=2, enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


# ---- Pictures. ----


def test_colormap_endpoints_and_order():
  colors = visualize.colormap(np.array([0.0, 0.5, 1.0])).astype(int)
  np.testing.assert_array_equal(colors[0], [0, 0, 4])
  np.testing.assert_array_equal(colors[-1], [252, 255, 164])
  assert colors.sum(axis=1)[0] < colors.sum(axis=1)[1] < colors.sum(axis=1)[2]


def test_overlay_is_brightest_where_the_heat_is_and_outlines_masks():
  frames = np.zeros((2, 16, 16, 3), np.uint8)
  heat = np.zeros((2, 1, 16, 16), np.float32)
  heat[1, 0, 4:8, 4:8] = 1.0  # The object is in frame 1 only.
  masks = heat > 0.5
  overlays = visualize.heatmap_overlays(frames, heat, masks)
  assert overlays.shape == (2, 1, 16, 16, 3)
  brightness = overlays[1, 0].astype(int).sum(-1)
  assert brightness[5, 5] > brightness[12, 12]
  np.testing.assert_array_equal(overlays[1, 0, 4, 4], [255, 255, 255])  # Mask corner: outline.
  assert (overlays[0, 0].astype(int).sum(-1) < 100).all()  # Cold everywhere in frame 0.


def test_picture_layout_and_png(tmp_path):
  rng = np.random.default_rng(0)
  num_frames, k, size = 3, 2, 32
  frames = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
  heat = rng.random((num_frames, k, size, size)).astype(np.float32)
  views = rng.integers(0, 256, (num_frames, 1, size, size, 3), dtype=np.uint8)
  picture = visualize.make_picture(frames, heat, views, heat > 0.5, title="step 1")
  scale = 128 // size  # Tiles are enlarged to 128 px.
  rows, tile = 1 + k + 1, size * scale + 2
  assert picture.shape == (16 + 14 + rows * tile, 96 + num_frames * tile, 3)
  # The first frame tile is the frame, enlarged by pixel repetition.
  top, left = 16 + 14, 96
  np.testing.assert_array_equal(picture[top:top + size * scale:scale, left:left + size * scale:scale],
                                frames[0])
  path = str(tmp_path / "p.png")
  visualize.save_picture(path, picture)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), picture)


def test_picture_rejects_mismatched_shapes():
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="heatmaps has shape"):
    visualize.make_picture(frames, np.zeros((3, 1, 8, 8)), np.zeros((2, 1, 8, 8, 3), np.uint8))
