"""The train steps of the paper's configs lower for TPU and CUDA (`jax.export`), from a CPU.

Lowering for a platform uses that platform's rules for every operation, so an operation with
only a CPU lowering (a host callback, a LAPACK custom call, a CPU-only kernel) fails here instead
of on the accelerator. Only shapes are used (`abstract_train_state`): nothing of ViT-S/16's size
is allocated or compiled.
"""
import os

import jax
import jax.numpy as jnp
import pytest

from dora_runs import ROOT, load_config
from dora_jax.trainer import loop
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules
from dora_jax.trainer import step as train_step

PLATFORMS = ("tpu", "cuda")
STEPS_PER_EPOCH, TOTAL_STEPS = 10, 100


def _abstract_batch(config):
  """The ShapeDtypeStructs of a batch of `config` (data/pipeline.py's keys and shapes)."""
  data = config.data
  clips = (config.batch_size, data.frames_per_clip)
  frames = jax.ShapeDtypeStruct(clips + (data.global_size, data.global_size, 3), jnp.uint8)
  batch = {"frames": frames}
  if data.global_crops_per_frame == 2:
    batch["second_frames"] = frames
  if data.num_local_crops:
    batch["crops"] = jax.ShapeDtypeStruct(
        clips + (data.num_local_crops, data.local_size, data.local_size, 3), jnp.uint8)
  return batch


@pytest.mark.parametrize("name", ["dora_vits16_wtours.py", "dino_vits16_wtours.py"])
def test_paper_train_step_lowers_for_tpu_and_cuda(name):
  config = load_config(os.path.join(ROOT, "configs", name), "data=/unused")
  assert config.model.variant == "S/16" and config.data.global_size == 224  # The paper's model.
  config.batch_size = 2  # A small batch: the operations do not depend on its size.
  if config.dora.enabled:
    config.data.frames_per_clip = 2  # Frame 0 and one tracked frame.
  plan = plan_lib.TrainPlan.from_config(config)
  graphdef, abstract_state = train_step.abstract_train_state(config, plan)
  # The program the trainer jits: the step and its finiteness check; its schedule input.
  step = jax.jit(loop.with_finite_check(train_step.make_train_step(config, plan, graphdef),
                                        trained=lambda state: state["student"]))
  inputs = schedules.make_schedules(config, steps_per_epoch=STEPS_PER_EPOCH,
                                    total_steps=TOTAL_STEPS).at(0)
  exported = jax.export.export(step, platforms=PLATFORMS)(abstract_state, _abstract_batch(config),
                                                          inputs)
  assert exported.platforms == PLATFORMS
  # The lowered step returns a state of the shapes it was given (no silent reshaping).
  new_state, metrics = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract_state)
  assert metrics["loss"].shape == metrics["finite"].shape == ()
