"""Checkpoints verified on restore: checksums, each kind of damage, fallback, a full disk.

Most tests drive the Checkpointer on a small pytree; one runs dora-train end to end (a tiny
model, as in test_train.py) and damages its latest checkpoint.
"""
import errno
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dora_jax import checkpoint
from dora_jax.checkpoint import checksums
from dora_jax.checkpoint import items
from dora_jax import pretrained
from dora_jax.trainer import sharding
from dora_runs import DEMO_CONFIG, demo_flags, start_dora_train


def _state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "step": jnp.int32(seed),
      # The largest array: its bytes fill the largest file of the checkpoint.
      "student": {"kernel": jnp.asarray(rng.normal(size=(64, 96)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(96,)), jnp.bfloat16)},
      "count": jnp.asarray(rng.integers(-100, 100, size=(3, 2)), jnp.int8),
      "rng": jax.random.key_data(jax.random.key(seed)),
  }


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))


def _abstract(state, mesh):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))


def _assert_equal(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- The checksum. ----

_MASK = (1 << 32) - 1


def _numpy_checksum(x: np.ndarray) -> str:
  """The checksum of `checksums._array_checksum`, in NumPy on 64-bit integers."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint64)
  else:
    words = x.view(f"u{x.dtype.itemsize}").astype(np.uint64)
  position = np.arange(words.size, dtype=np.uint64).reshape(words.shape)

  def mix(v):
    v = v ^ (v >> 16)
    v = (v * 0x85EBCA6B) & _MASK
    v = v ^ (v >> 13)
    v = (v * 0xC2B2AE35) & _MASK
    return v ^ (v >> 16)

  lanes = [int(np.sum(mix((words + mix(position ^ seed)) & _MASK))) & _MASK
           for seed in checksums._CHECKSUM_SEEDS]
  return "".join(f"{lane:08x}" for lane in lanes)


def test_checksums_equal_a_numpy_reference():
  rng = np.random.default_rng(0)
  arrays = {
      "f32": rng.normal(size=(5, 7, 3)).astype(np.float32),
      "bf16": jnp.asarray(rng.normal(size=(33,)), jnp.bfloat16),
      "i8": rng.integers(-128, 128, size=(4, 4)).astype(np.int8),
      "u32": rng.integers(0, 2**32, size=(6,), dtype=np.uint64).astype(np.uint32),
      "mask": rng.random(size=(9,)) > 0.5,
      "scalar": np.int32(-7),
  }
  record = checksums.array_record({name: jnp.asarray(x) for name, x in arrays.items()})
  for name, x in arrays.items():
    assert record[name]["checksum"] == _numpy_checksum(np.asarray(x)), name
    assert record[name]["shape"] == list(np.shape(x))
  assert record["bf16"]["dtype"] == "bfloat16"


def test_checksum_sees_damage_and_not_the_sharding():
  x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
  checksum = lambda a: checksums.array_record({"x": a})["x"]["checksum"]
  reference = checksum(jnp.asarray(x))
  damaged = []
  flipped = x.copy()
  flipped.view(np.uint32)[3, 5] ^= 1  # The lowest bit of one element.
  damaged.append(flipped)
  signs = x.copy()
  signs[0, 0], signs[5, 9] = -signs[0, 0], -signs[5, 9]  # Two sign bits: 2^31 + 2^31 = 0 mod 2^32.
  damaged.append(signs)
  swapped = x.copy()
  swapped[[2, 6]] = swapped[[6, 2]]  # Same values, other places.
  damaged.append(swapped)
  zeroed = x.copy()
  zeroed[4:] = 0
  damaged.append(zeroed)
  for bad in damaged:
    assert checksum(jnp.asarray(bad)) != reference
  # The same values spread over the 4 devices (rows) or over 2 x 2: the same checksum.
  mesh = _mesh()
  for spec in (jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec(None, "data")):
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    assert len(sharded.sharding.device_set) == 4
    assert checksum(sharded) == reference


# ---- Damage, and the fallback to the newest intact checkpoint. ----


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def _flip_bits(step_dir):
  path = _largest_array_file(step_dir)
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  for i in range(middle, middle + 8):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _garble_data_state(step_dir):
  open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w").write('{"position": 3')


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _garble_checksums(step_dir):
  open(os.path.join(step_dir, "checksums", checksums.CHECKSUMS_FILE), "w").write("{")


DAMAGE = {
    "flipped bits": (_flip_bits, "1 of its 5 arrays differ from the checksums saved with them "
                                 "(e.g. student/kernel)"),
    "truncated array file": (_truncate, "cannot read it (OUT_OF_RANGE"),
    "garbled data state": (_garble_data_state, "data/process_0-of-1.json is not valid JSON"),
    "deleted _METADATA": (_delete_metadata, "state/_METADATA is missing or unreadable"),
    "garbled checksums": (_garble_checksums, f"checksums/{checksums.CHECKSUMS_FILE} is not "
                                             "valid JSON"),
}


@pytest.fixture
def two_checkpoints(tmp_path):
  """Checkpoints 1 and 2 of toy states in tmp_path/ckpt."""
  directory = str(tmp_path / "ckpt")
  manager = checkpoint.Checkpointer(directory, keep=3)
  for step in (1, 2):
    manager.save(step, _state(step), {"position": step})
  manager.close()
  return directory


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_intact_one(two_checkpoints, kind, caplog):
  damage, message = DAMAGE[kind]
  damage(os.path.join(two_checkpoints, "2"))
  mesh = _mesh()
  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  with pytest.raises(checkpoint.CheckpointDamagedError) as error:
    manager.restore(2, _abstract(_state(0), mesh))
  assert str(error.value).startswith(f"checkpoint 2 in {two_checkpoints} is damaged: {message}")
  assert "\n" not in str(error.value)

  state, data_state = manager.restore_latest(_abstract(_state(0), mesh))
  _assert_equal(state, _state(1))
  assert data_state == {"position": 1}
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and message in warnings[0]
  assert warnings[0].endswith(f"Moved it to {two_checkpoints}/2.damaged; resuming from step 1.")
  assert sorted(os.listdir(two_checkpoints)) == ["1", "2.damaged"]
  # The resumed run saves step 2 again, and that checkpoint is the one a restore then finds.
  manager.save(2, _state(22), {"position": 22})
  manager.wait_until_finished()
  state, data_state = manager.restore_latest(_abstract(_state(0), mesh))
  manager.close()
  _assert_equal(state, _state(22))
  assert data_state == {"position": 22}


def test_no_intact_checkpoint_is_one_line_and_moves_nothing(two_checkpoints):
  _flip_bits(os.path.join(two_checkpoints, "2"))
  _delete_metadata(os.path.join(two_checkpoints, "1"))
  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  with pytest.raises(checkpoint.CheckpointDamagedError) as error:
    manager.restore_latest(_abstract(_state(0), _mesh()))
  manager.close()
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"no checkpoint in {two_checkpoints} is intact: checkpoint 2 ")
  assert "(and 1 older damaged)" in message and f"move {two_checkpoints} aside" in message
  assert sorted(os.listdir(two_checkpoints)) == ["1", "2"]


def test_another_model_is_a_mismatch_not_damage(two_checkpoints):
  other = dict(_state(0), student={"kernel": jnp.zeros((64, 32)), "bias": jnp.zeros((32,))})
  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"different model: student/bias has shape \(96,\)"):
    manager.restore_latest(_abstract(other, _mesh()))
  manager.close()
  assert sorted(os.listdir(two_checkpoints)) == ["1", "2"]


def test_checksums_describe_what_was_saved_although_the_state_moves_on(tmp_path):
  """The next step donates the state's buffers while the asynchronous save still writes them."""
  manager = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  state = jax.device_put(_state(5))
  saved = jax.device_get(state)
  manager.save(5, state, {"position": 5})
  step = jax.jit(lambda s: jax.tree.map(lambda x: x * 2, s), donate_argnums=0)
  for _ in range(3):
    state = step(state)
  manager.wait_until_finished()
  restored, _ = manager.restore(5, _abstract(saved, _mesh()))  # Verified against its checksums.
  manager.close()
  _assert_equal(restored, saved)


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    two_checkpoints, monkeypatch):
  def no_space(self, directory, args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  monkeypatch.setattr(items.DataStateHandler, "save", no_space)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    manager.save(3, _state(3), {"position": 3})
  monkeypatch.undo()
  manager.close()
  assert str(error.value) == (
      f"saving checkpoint 3 to {two_checkpoints} failed: No space left on device; the last "
      "complete checkpoint is step 2. Free some space and run the same command again to resume.")
  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  assert manager.all_steps() == [1, 2]
  state, _ = manager.restore_latest(_abstract(_state(0), _mesh()))
  manager.close()
  _assert_equal(state, _state(2))


def test_checkpoint_without_checksums_is_restored_with_a_warning(two_checkpoints, caplog):
  """Written before checksums existed: nothing to verify against, but still the run's state."""
  step_dir = os.path.join(two_checkpoints, "2")
  shutil.rmtree(os.path.join(step_dir, "checksums"))
  metadata_file = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  metadata = json.load(open(metadata_file))
  metadata["custom_metadata"] = {}
  metadata["item_handlers"].pop("checksums")
  json.dump(metadata, open(metadata_file, "w"))
  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  state, _ = manager.restore_latest(_abstract(_state(0), _mesh()))
  manager.close()
  _assert_equal(state, _state(2))
  assert "Checkpoint 2 in" in caplog.text and "has no checksums" in caplog.text
  # A checkpoint that says it has checksums but lost them is damaged, not old.
  shutil.rmtree(os.path.join(two_checkpoints, "1", "checksums"))
  manager = checkpoint.Checkpointer(two_checkpoints, keep=3)
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=f"checkpoint 1 .* is damaged: checksums/{checksums.CHECKSUMS_FILE} "
                           "is missing"):
    manager.restore(1, _abstract(_state(0), _mesh()))
  manager.close()


# ---- End to end: dora-train resumes from the intact checkpoint; load_backbone refuses. ----


def _flip_bits_everywhere(step_dir):
  """A byte in every 256 of every array file: the teacher's arrays are hit too."""
  for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    data = bytearray(open(path, "rb").read())
    for i in range(100, len(data), 256):
      data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def test_training_falls_back_and_load_backbone_refuses_damage(data_dir, env, tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config", DEMO_CONFIG, "--workdir", workdir] + demo_flags(
      data_dir, total_steps=8, checkpoint_every_steps=4, picture_every_steps=0)
  process = start_dora_train(args, env)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  checkpoint_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  assert sorted(os.listdir(checkpoint_dir)) == ["4", "8"]
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)

  # load_backbone: a damaged teacher is an error, never NaN features.
  _flip_bits_everywhere(os.path.join(copy, checkpoint.CHECKPOINT_DIR, "8"))
  with pytest.raises(checkpoint.CheckpointDamagedError) as error:
    pretrained.load_backbone(copy)
  assert str(error.value).startswith(
      f"checkpoint 8 in {copy}/{checkpoint.CHECKPOINT_DIR} is damaged: ")
  assert "\n" not in str(error.value)

  # dora-train: 8 bytes flipped in the largest file -> reported, set aside, resumed from step 4.
  record = open(os.path.join(checkpoint_dir, "8", "checksums", checksums.CHECKSUMS_FILE)).read()
  _flip_bits(os.path.join(checkpoint_dir, "8"))
  process = start_dora_train(args, env)  # The same command.
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr
  warnings = [line for line in stderr.splitlines() if "is damaged" in line]
  assert len(warnings) == 1 and warnings[0].endswith(
      f"Moved it to {checkpoint_dir}/8.damaged; resuming from step 4."), stderr[-3000:]
  # The flipped bytes land in whatever the largest file holds (the state's layout varies): a
  # value orbax reads back, caught by the checksums, or a chunk tensorstore cannot decode.
  assert ("differ from the checksums saved with them" in warnings[0]
          or ": cannot read it (" in warnings[0]), warnings[0]
  assert sorted(os.listdir(checkpoint_dir)) == ["4", "8", "8.damaged"]
  # Steps 5-8 again, from the same state and data position: the arrays saved before the damage.
  assert open(os.path.join(checkpoint_dir, "8", "checksums",
                           checksums.CHECKSUMS_FILE)).read() == record


# ---- Keep-n, bitwise restore and shape checks on a toy state. ----


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


def test_checkpointer_keeps_last_and_restores_bitwise(tmp_path):
  mesh = sharding.make_mesh(_mesh_config())
  manager = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
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
  manager = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  manager.save(5, _toy_state(5, width=3), {})
  manager.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"different model: student/kernel has shape \(4, 3\) in the "
                           r"checkpoint but \(4, 6\)"):
    manager.restore(5, _abstract(_toy_state(0, width=6), mesh))
  manager.close()


def test_describe_mismatch_reports_missing_and_extra():
  assert checksums.describe_mismatch({"a": (1,)}, {"a": (1,)}) is None
  assert "not in the checkpoint (e.g. b)" in checksums.describe_mismatch(
      {"a": (1,)}, {"a": (1,), "b": (2,)})
  assert "this config does not (e.g. c)" in checksums.describe_mismatch(
      {"a": (1,), "c": (2,)}, {"a": (1,)})


# ---- read_state: one verified read of a whole state or of one part, lists included. ----


def test_read_state_reads_an_optimizer_chain_whole_or_in_part_and_finds_damage(tmp_path):
  """A fine-tuning state: its optimizer state is a chain (tuples, saved as lists, and empty
  states). read_state reads it as saved, whole or one part, bitwise; damage is an error."""
  import optax  # pylint: disable=g-import-not-at-top
  params = _state(1)["student"]
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = {"step": jnp.int32(7), "head": params, "opt_state": optimizer.init(params),
           "rng": jax.random.key_data(jax.random.key(0))}
  directory = str(tmp_path / "ckpt")
  manager = checkpoint.Checkpointer(directory, keep=2)
  manager.save(7, state, {"position": 3})
  manager.wait_until_finished()
  manager.close()

  step, whole = checkpoint.read_state(directory)
  assert step == 7
  assert checksums.array_record(whole) == checksums.array_record(state)
  _assert_equal(whole["opt_state"], state["opt_state"])
  _, opt_state = checkpoint.read_state(directory, 7, part="opt_state")
  assert checksums.array_record({"opt_state": opt_state}) == checksums.array_record(
      {"opt_state": state["opt_state"]})
  # Into a given abstract tree (shardings set): the shapes are checked before anything is read.
  abstract = _abstract(params, _mesh())
  _, head = checkpoint.read_state(directory, 7, abstract, part="head")
  _assert_equal(head, params)
  wider = _abstract(_state(1) | {"student": {"kernel": jnp.zeros((64, 97))}}, _mesh())["student"]
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"'head' part .* kernel has shape"):
    checkpoint.read_state(directory, 7, wider, part="head")
  with pytest.raises(checkpoint.CheckpointMismatchError, match="has no 'teacher' in its state"):
    checkpoint.read_state(directory, 7, part="teacher")
  with pytest.raises(FileNotFoundError, match=f"{directory} holds no finished checkpoint for "
                                              "step 8"):
    checkpoint.read_state(directory, 8)

  _flip_bits(os.path.join(directory, "7"))
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=f"checkpoint 7 in {directory} is damaged: "):
    checkpoint.read_state(directory)
