"""The jitted DoRA (and DINO) update on a tiny model: it learns, the teacher is an EMA, it is
deterministic; DINO's loss pairs different views; with the schedules as inputs it computes what
the step with the schedules inside did."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from conftest import make_tiny_config
from dora_jax.models import vit
from dora_jax.trainer import optim
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules
from dora_jax.trainer import step as train_step

STEPS_PER_EPOCH = 10
TOTAL_STEPS = 100


def tiny_config(**dora):
  """The shared tiny config (conftest.py) with a fixed centre and a 2-clip batch."""
  config = make_tiny_config(**{
      "model.drop_path_rate": 0.1,
      "batch_size": 2,
      "optim.base_lr": 0.05,  # peak lr 4e-4 at batch 2
      "optim.warmup_epochs": 0,
      "optim.freeze_last_layer_epochs": 1,
      # A frozen centre keeps the target fixed on a repeated batch, so the loss measures only
      # how well the student matches the teacher (a moving centre flattens the targets there).
      "loss.center_momentum": 1.0,
      "loss.warmup_teacher_temp_epochs": 0,
  })
  config.dora.update(dora)
  return config


def tiny_batch(seed=0, batch=2, frames=2, crops=2, second_frames=False):
  rng = np.random.default_rng(seed)
  out = {
      "frames": jnp.asarray(rng.integers(0, 256, (batch, frames, 32, 32, 3)), jnp.uint8),
      "crops": jnp.asarray(rng.integers(0, 256, (batch, frames, crops, 16, 16, 3)), jnp.uint8),
  }
  if second_frames:  # DINO's second global crops.
    out["second_frames"] = jnp.asarray(rng.integers(0, 256, (batch, frames, 32, 32, 3)),
                                       jnp.uint8)
  return out


def setup(config, steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL_STEPS):
  """(graphdef, state, step(state, batch)): the jitted step fed, as the trainer does, the host's
  schedule values at the state's step."""
  plan = plan_lib.TrainPlan.from_config(config)
  graphdef, state = train_step.init_train_state(config, plan, rng=jax.random.PRNGKey(0))
  jitted = jax.jit(train_step.make_train_step(config, plan, graphdef))
  schedule = schedules.make_schedules(config, steps_per_epoch=steps_per_epoch,
                                      total_steps=total_steps)
  step = lambda state, batch: jitted(state, batch, schedule.at(int(state["step"])))
  return graphdef, state, step


@pytest.fixture(scope="module")
def dora_run():
  config = tiny_config()
  graphdef, state, step = setup(config)
  return config, graphdef, state, step


def test_loss_falls_on_a_fixed_batch(dora_run):
  _, _, state, step = dora_run
  batch = tiny_batch()
  values, kls = [], []
  for _ in range(30):
    state, metrics = step(state, batch)
    values.append(float(metrics["loss"]))
    kls.append(float(metrics["kl"]))
  assert np.all(np.isfinite(values))
  assert np.mean(values[-5:]) < 0.8 * values[0], values
  assert np.mean(kls[-5:]) < 0.5 * kls[0], kls
  assert 0.0 < float(metrics["masked_area"]) < 1.0


def test_teacher_moves_only_by_ema(dora_run):
  config, _, state, step = dora_run
  before = jax.tree.map(np.asarray, state)  # `step` does not donate here
  after, metrics = step(state, tiny_batch(1))
  momentum = float(schedules.make_schedules(
      config, steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL_STEPS).teacher_momentum(0))
  assert momentum == pytest.approx(float(metrics["teacher_momentum"]))
  expected = jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * np.asarray(s),
                          before["teacher"], after["student"])
  jax.tree.map(lambda e, a: np.testing.assert_allclose(np.asarray(a), e, rtol=1e-6, atol=1e-7),
               expected, after["teacher"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(np.asarray(a) != b),
                                         after["student"], before["student"]))
  assert any(changed)
  assert int(after["step"]) == int(before["step"]) + 1


def test_same_key_and_batch_give_bit_identical_results(dora_run):
  _, _, state, step = dora_run
  batch = tiny_batch(2)
  first_state, first_metrics = step(state, batch)
  second_state, second_metrics = step(state, batch)
  for a, b in zip(jax.tree.leaves((first_state, first_metrics)),
                  jax.tree.leaves((second_state, second_metrics))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A different key (the state's rng) changes the random views.
  other_state = dict(state, rng=jax.random.PRNGKey(123))
  _, other_metrics = step(other_state, batch)
  assert float(other_metrics["loss"]) != float(first_metrics["loss"])


@pytest.mark.parametrize("run", ["dora_run", "dino_run"])
def test_no_gradient_reaches_the_teacher(run, request):
  config, graphdef, state, _ = request.getfixturevalue(run)
  batch = tiny_batch(3, frames=1, second_frames=True) if run == "dino_run" else tiny_batch(3)

  def loss_of(params, teacher_params):
    loss, _ = train_step.compute_loss(config, plan_lib.TrainPlan.from_config(config).masking, graphdef, params,
                                      teacher_params, state["constants"], state["center"], batch,
                                      jnp.float32(0.04), jax.random.PRNGKey(5))
    return loss

  student_grads, teacher_grads = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(state["student"],
                                                                            state["teacher"])
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(teacher_grads))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(student_grads))


def test_last_layer_frozen_during_first_epoch(dora_run):
  _, _, state, step = dora_run
  new_state, _ = step(state, tiny_batch(4))
  head = lambda s: s["student"]["head"]
  for name in ("last_layer_v", "last_layer_g"):
    np.testing.assert_array_equal(np.asarray(head(new_state)[name][...]),
                                  np.asarray(head(state)[name][...]))
  assert np.any(np.asarray(head(new_state)["mlp"][0]["kernel"][...])
                != np.asarray(head(state)["mlp"][0]["kernel"][...]))
  later = dict(new_state, step=jnp.int32(STEPS_PER_EPOCH))
  thawed, metrics = step(later, tiny_batch(4))
  # Its AdamW starts now (as PyTorch's, which skipped it while its gradient was None): a fresh
  # Adam's first step moves an entry by lr * (+-1 + weight_decay * p), less only where the
  # gradient is near Adam's eps. (Had its count run on with zero moments through the frozen
  # step, the Adam part would be 0.74 lr.)
  moved = np.abs(np.asarray(head(thawed)["last_layer_v"][...])
                 - np.asarray(head(later)["last_layer_v"][...]))
  np.testing.assert_allclose(np.median(moved), float(metrics["lr"]), rtol=0.02)


def test_no_weight_decay_on_one_dimensional_parameters():
  config = tiny_config()
  config.optim.weight_decay = config.optim.weight_decay_end = 0.5
  graphdef, state = train_step.init_train_state(config, plan_lib.TrainPlan.from_config(config),
                                                rng=jax.random.PRNGKey(0))
  schedule = schedules.make_schedules(config, steps_per_epoch=STEPS_PER_EPOCH,
                                      total_steps=TOTAL_STEPS)
  optimizer = optim.make_optimizer(config)
  zero_grads = jax.tree.map(jnp.zeros_like, state["student"])
  step = STEPS_PER_EPOCH  # the head's last layer is thawed: every parameter is updated
  updates, _ = jax.jit(optimizer.update)(zero_grads, state["opt_state"], state["student"],
                                         **schedule.at(step))
  lr = float(schedule.learning_rate(step))
  for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(state["student"])):
    update, param = np.asarray(update), np.asarray(param)
    if param.ndim > 1 or param.shape == (config.model.out_dim,):  # incl. the head's gain
      np.testing.assert_allclose(update, -lr * 0.5 * param, rtol=1e-5, atol=1e-12)
    else:
      assert np.all(update == 0)


def dino_config():
  """DINO on frames as images: two global crops per frame; no drop path, so that at step 0 the
  student equals the teacher and the loss can be computed by hand."""
  config = tiny_config(enabled=False)
  config.model.drop_path_rate = 0.0
  config.data.frames_per_clip = 1
  config.data.global_crops_per_frame = 2
  return config


@pytest.fixture(scope="module")
def dino_run():
  config = dino_config()
  graphdef, state, step = setup(config)
  return config, graphdef, state, step


def test_dino_loss_falls_on_a_fixed_batch(dino_run):
  _, _, state, step = dino_run
  batch = tiny_batch(5, frames=1, second_frames=True)
  values, kls = [], []
  for _ in range(30):
    state, metrics = step(state, batch)
    values.append(float(metrics["loss"]))
    kls.append(float(metrics["kl"]))
  assert np.all(np.isfinite(values))
  assert np.mean(values[-5:]) < 0.8 * values[0], values
  assert min(kls) > -1e-4 and np.mean(kls[-5:]) < 0.5 * kls[0], kls
  assert float(metrics["masked_area"]) == 0.0 and float(metrics["object_overlap"]) == 0.0


def test_dino_loss_is_dinos_pairing_of_the_models_outputs(dino_run):
  config, graphdef, state, _ = dino_run
  batch = tiny_batch(6, frames=1, second_frames=True)
  center = jnp.asarray(np.random.default_rng(0).normal(size=config.model.out_dim), jnp.float32)
  loss, aux = jax.jit(lambda: train_step.compute_loss(
      config, None, graphdef, state["student"], state["teacher"], state["constants"], center,
      batch, jnp.float32(0.04), jax.random.PRNGKey(0)))()

  @jax.jit
  def head_logits(images):  # The teacher (= the student at step 0) on each view by itself.
    model = nnx.merge(graphdef, state["teacher"], state["constants"])
    return model(vit.normalize_images(images.reshape((-1,) + images.shape[-3:])))[0]

  teacher = [np.asarray(head_logits(batch[k]), np.float64) for k in ("frames", "second_frames")]
  crops = np.asarray(head_logits(batch["crops"]), np.float64).reshape(2, 2, -1)  # (B, M, K)
  # The centre averages the teacher's outputs on both global crops (test_losses checks the mean).
  np.testing.assert_allclose(np.asarray(aux["teacher_logits"]),
                             np.stack(teacher, 1)[:, None], rtol=1e-4, atol=1e-5)
  student = teacher + [crops[:, 0], crops[:, 1]]  # Views: global 0, global 1, local 0, local 1.

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  targets = [softmax((t - np.asarray(center)) / 0.04) for t in teacher]
  pairs = [np.mean(-np.sum(targets[i] * np.log(softmax(student[j] / 0.1)), -1))
           for i in range(2) for j in range(4) if j != i]
  np.testing.assert_allclose(float(loss), np.mean(pairs), rtol=1e-4)


def test_dora_step_refuses_dinos_second_crops(dora_run):
  _, _, state, step = dora_run
  with pytest.raises(ValueError, match="second_frames"):
    step(state, tiny_batch(5, second_frames=True))


def test_keep_mode_with_bfloat16_matmuls():
  config = tiny_config(mask_mode="keep")
  config.model.compute_dtype = "bfloat16"
  _, state, step = setup(config)
  _, metrics = step(state, tiny_batch(6))
  assert np.isfinite(float(metrics["loss"]))
  assert 0.0 < float(metrics["masked_area"]) < 1.0
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["student"]))


def test_visualize_fn_shapes(dora_run):
  config, graphdef, state, _ = dora_run
  out = jax.jit(train_step.make_visualize_fn(plan_lib.TrainPlan.from_config(config), graphdef))(
      state, tiny_batch(7), jax.random.PRNGKey(0))
  assert out["frames"].shape == (2, 32, 32, 3) and out["frames"].dtype == jnp.uint8
  assert out["heatmaps"].shape == (2, 2, 32, 32)
  np.testing.assert_allclose(np.asarray(out["heatmaps"]).max(axis=(-1, -2)), 1.0, rtol=1e-6)
  assert out["masks"].shape == (2, 2, 32, 32)
  assert out["masked_views"].shape == (2, 1, 32, 32, 3)


def test_bad_batches_raise_at_trace_time_and_bad_options_before(dora_run):
  config, _, state, step = dora_run
  with pytest.raises(ValueError, match=r"batch\['frames'\]"):
    step(state, {"frames": jnp.zeros((2, 2, 32, 32), jnp.uint8)})
  too_many = tiny_config(num_objects=5)  # the tiny ViT has 4 heads
  with pytest.raises(ValueError, match="dora.num_objects=5"):
    setup(too_many)


# The step's output before the schedules became its inputs (issue 18), saved by the code of
# commit e3086e0 for `reference_config()` on `tiny_batch(i)`, i = 0..7: per-step metrics
# ('metrics/NAME', (8,)), the final centre, and every 64th-or-so entry of each student and
# teacher parameter ('student/PATH', flattened, `[::max(1, size // 64)]`).
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "train_step_before_issue18.npz")
REFERENCE_STEPS_PER_EPOCH, REFERENCE_TOTAL_STEPS = 3, 12


def reference_config():
  """Every schedule moves within 8 steps: the learning-rate warm-up (3 steps) and its cosine,
  the teacher temperature's warm-up (0.04 to 0.07 over 3 epochs), the last layer's thaw (step 3)."""
  config = tiny_config()
  config.optim.warmup_epochs = 1
  config.optim.freeze_last_layer_epochs = 1
  config.loss.warmup_teacher_temp_epochs = 3
  config.loss.teacher_temp = 0.07
  config.loss.center_momentum = 0.9
  return config


def test_step_equals_the_step_with_the_schedules_inside():
  saved = np.load(REFERENCE)
  _, state, step = setup(reference_config(), REFERENCE_STEPS_PER_EPOCH, REFERENCE_TOTAL_STEPS)
  metrics = []
  for i in range(len(saved["metrics/loss"])):
    state, step_metrics = step(state, tiny_batch(i))
    metrics.append(step_metrics)
  for name in [key[len("metrics/"):] for key in saved if key.startswith("metrics/")]:
    np.testing.assert_allclose([float(m[name]) for m in metrics], saved[f"metrics/{name}"],
                               rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(np.asarray(state["center"]), saved["center"], rtol=1e-5, atol=1e-7)
  # atol: a parameter whose gradient is zero up to rounding (the attention's key bias: the
  # softmax ignores it) gets Adam updates of +-lr from that rounding noise, 4e-4 here.
  compared = 0
  for part in ("student", "teacher"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(state[part]):
      flat = np.asarray(leaf).ravel()
      np.testing.assert_allclose(flat[::max(1, flat.size // 64)],
                                 saved[f"{part}/{jax.tree_util.keystr(path)}"],
                                 rtol=1e-5, atol=1e-5, err_msg=f"{part}{path}")
      compared += 1
  assert compared == len([k for k in saved if k.startswith(("student/", "teacher/"))])
