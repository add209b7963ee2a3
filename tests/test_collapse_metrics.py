"""The collapse indicators of every step (teacher_entropy, teacher_batch_entropy,
prototypes_used), computed in the jitted step sharded over four fake devices, against NumPy float64
on the teacher's outputs of the whole global batch, for DoRA and DINO."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_tiny_config
from dora_jax.models import vit
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules
from dora_jax.trainer import sharding
from dora_jax.trainer import step as train_step


def _config(kind):
  config = make_tiny_config(**{"batch_size": 8, "loss.warmup_teacher_temp_epochs": 0})
  if kind == "dino":
    config.dora.enabled = False
    config.data.frames_per_clip = 1
    config.data.global_crops_per_frame = 2
  return config


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  frames = config.data.frames_per_clip
  shape = (config.batch_size, frames, 32, 32, 3)
  batch = {"frames": rng.integers(0, 256, shape, dtype=np.uint8),
           "crops": rng.integers(0, 256, (config.batch_size, frames, 2, 16, 16, 3),
                                 dtype=np.uint8)}
  if config.data.global_crops_per_frame == 2:
    batch["second_frames"] = rng.integers(0, 256, shape, dtype=np.uint8)
  return batch


def _reference(teacher_logits, center, temperature):
  """NumPy float64: the targets softmax((g - c) / tau) of every teacher view of the batch."""
  scores = (np.asarray(teacher_logits, np.float64) - np.asarray(center, np.float64)) / temperature
  scores = scores.reshape(-1, scores.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  mean = probs.mean(0)
  return {"teacher_entropy": np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-300)), -1)),
          "teacher_batch_entropy": -np.sum(mean * np.log(np.maximum(mean, 1e-300))),
          "prototypes_used": len(np.unique(scores.argmax(-1)))}


@pytest.fixture(scope="module", params=["dora", "dino"])
def run(request):
  """(config, run(center) -> (the step's metrics with the batch split over the 4 fake devices,
  the teacher's logits of the same batch computed unsharded, the teacher temperature)); the
  jitted step compiles once for both tests."""
  config = _config(request.param)
  plan = plan_lib.TrainPlan.from_config(config)
  graphdef, state = train_step.init_train_state(config, plan, rng=jax.random.PRNGKey(0))
  schedule = schedules.make_schedules(config, steps_per_epoch=10, total_steps=100).at(0)
  local = _batch(config, 0)
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.shape["data"] == 4
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
  step = jax.jit(train_step.make_train_step(config, plan, graphdef))
  views = np.concatenate([local[key] for key in ("frames", "second_frames") if key in local])

  @jax.jit
  def teacher_logits(images):  # Every global view (the teacher's), in any order.
    teacher = nnx.merge(graphdef, state["teacher"], state["constants"])
    return teacher(vit.normalize_images(images.reshape((-1,) + images.shape[-3:])))[0]

  def run_with(center):
    _, metrics = step(dict(state, center=jnp.asarray(center, jnp.float32)), batch, schedule)
    return metrics, teacher_logits(views), float(schedule[schedules.TEACHER_TEMP])

  return config, run_with


def test_collapse_metrics_equal_numpy_over_the_global_batch(run):
  config, run_with = run
  center = 0.02 * np.random.default_rng(1).normal(size=config.model.out_dim)
  metrics, teacher_logits, temperature = run_with(center)
  rows = config.batch_size * config.data.frames_per_clip * config.data.global_crops_per_frame
  assert np.asarray(teacher_logits).reshape(-1, config.model.out_dim).shape[0] == rows
  expected = _reference(teacher_logits, center, temperature)
  assert expected["prototypes_used"] > 1  # A batch that can tell one device's rows from all.
  assert int(metrics["prototypes_used"]) == expected["prototypes_used"]
  for name in ("teacher_entropy", "teacher_batch_entropy"):
    np.testing.assert_allclose(float(metrics[name]), expected[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  # The batch-mean distribution is never sharper than its rows (concavity of the entropy).
  assert float(metrics["teacher_batch_entropy"]) >= float(metrics["teacher_entropy"]) - 1e-5


def test_a_teacher_collapsed_onto_one_prototype(run):
  config, run_with = run
  center = np.zeros(config.model.out_dim)
  center[3] = -100.0  # Centring then pushes every view's target onto prototype 3.
  metrics, teacher_logits, temperature = run_with(center)
  assert _reference(teacher_logits, center, temperature)["prototypes_used"] == 1
  assert int(metrics["prototypes_used"]) == 1
  assert float(metrics["teacher_batch_entropy"]) < 1e-4
  assert float(metrics["teacher_entropy"]) < 1e-4
