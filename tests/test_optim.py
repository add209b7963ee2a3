"""The student's optimizer against optax.adamw and NumPy: the frozen last layer, decay, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dora_jax import config_base
from dora_jax.trainer import optim
from dora_jax.trainer import schedules

FREEZE_STEPS = 4
MAX_NORM = 3.0


def make(clip=MAX_NORM):
  config = config_base.get_base_config()
  config.optim.clip_grad_norm = clip
  schedule = schedules.Schedules(
      steps_per_epoch=FREEZE_STEPS, total_steps=40, peak_lr=1e-2, warmup_steps=3, min_lr=1e-4,
      weight_decay_start=0.04, weight_decay_end=0.4, momentum_start=0.996,
      teacher_temp_start=0.04, teacher_temp_end=0.04, teacher_temp_warmup_epochs=0,
      freeze_last_layer_steps=FREEZE_STEPS)
  return optim.make_optimizer(config), schedule


def params_like(rng):
  """A student-shaped tree: a body and a head whose last layer is last_layer_v / last_layer_g."""
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "backbone": {"kernel": normal(6, 4), "bias": normal(4), "cls_token": normal(1, 1, 4)},
      "head": {"mlp": {"kernel": normal(4, 3), "bias": normal(3)},
               "last_layer_v": normal(3, 8), "last_layer_g": normal(8)},
  }


def gradients(rng, params, scale=1.0):
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32),
                      params)


def split(tree):
  """(body, last layer): the tree without the head's last layer, and the last layer alone."""
  head = dict(tree["head"])
  last = {name: head.pop(name) for name in ("last_layer_v", "last_layer_g")}
  return {"backbone": tree["backbone"], "head": head}, last


def reference_adamw(learning_rate, weight_decay, clip=MAX_NORM):
  """optax's AdamW (PyTorch's defaults), decaying what `optim.decays` selects, after the clip.

  Schedules given here are functions of this optimizer's own count.
  """
  mask = lambda tree: jax.tree_util.tree_map_with_path(optim.decays, tree)
  adamw = optax.adamw(learning_rate=learning_rate, weight_decay=weight_decay, b1=0.9, b2=0.999,
                      eps=1e-8, mask=mask)
  return optax.chain(optim.clip_per_parameter(clip), adamw) if clip else adamw


def assert_trees_close(actual, expected, rtol=1e-6, atol=1e-9):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol,
                                                       atol=atol), actual, expected)


def test_frozen_last_layer_is_unchanged_and_the_rest_is_adamw():
  rng = np.random.default_rng(0)
  optimizer, schedule = make()
  params = params_like(rng)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  body, last = split(params)
  reference = reference_adamw(lambda count: schedule.learning_rate(int(count)),
                              lambda count: schedule.weight_decay(int(count)))  # count = step
  reference_state = reference.init(body)
  for step in range(FREEZE_STEPS):
    grads = gradients(rng, params, scale=2.0)  # some tensors above the clip norm, some below
    updates, state = update(grads, state, params, **schedule.at(step))
    new_params = optax.apply_updates(params, updates)
    body_updates, reference_state = reference.update(split(grads)[0], reference_state, body)
    assert_trees_close(split(updates)[0], body_updates)
    new_body, new_last = split(new_params)
    jax.tree.map(np.testing.assert_array_equal, new_last, last)  # bitwise: no update, no decay
    params, body = new_params, new_body


def test_first_update_after_unfreezing_is_a_fresh_adamw():
  rng = np.random.default_rng(1)
  optimizer, schedule = make()
  params = params_like(rng)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for step in range(FREEZE_STEPS):  # the frozen epoch, with gradients on the last layer
    updates, state = update(gradients(rng, params), state, params, **schedule.at(step))
    params = optax.apply_updates(params, updates)
  grads = gradients(rng, params)
  updates, state = update(grads, state, params, **schedule.at(FREEZE_STEPS))
  # A fresh AdamW with the learning rate and weight decay of the global step FREEZE_STEPS.
  fresh = reference_adamw(float(schedule.learning_rate(FREEZE_STEPS)),
                          float(schedule.weight_decay(FREEZE_STEPS)))
  last_params, last_grads = split(params)[1], split(grads)[1]
  expected, _ = fresh.update(last_grads, fresh.init(last_params), last_params)
  assert_trees_close(split(updates)[1], expected)
  # A fresh Adam's first step moves every entry by about the learning rate; the decay is small.
  lr = float(schedule.learning_rate(FREEZE_STEPS))
  v_update = np.abs(np.asarray(split(updates)[1]["last_layer_v"]))
  np.testing.assert_allclose(v_update, lr, rtol=0.1)


def test_weight_decay_on_matrices_tokens_and_the_head_gain_only():
  optimizer, schedule = make(clip=0.0)
  params = params_like(np.random.default_rng(2))
  zero = jax.tree.map(jnp.zeros_like, params)
  step = FREEZE_STEPS  # the last layer is thawed: every parameter is updated
  updates, _ = jax.jit(optimizer.update)(zero, optimizer.init(params), params,
                                         **schedule.at(step))
  rate = float(schedule.learning_rate(step)) * float(schedule.weight_decay(step))
  decayed = {"kernel", "cls_token", "last_layer_v", "last_layer_g"}

  def check(path, update, param):
    name = jax.tree_util.keystr(path).split("'")[-2]
    expected = -rate * np.asarray(param) if name in decayed else np.zeros(param.shape)
    np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-5, atol=1e-12)

  jax.tree_util.tree_map_with_path(check, updates, params)


def test_per_tensor_clip_equals_numpy():
  rng = np.random.default_rng(3)
  grads = {"small": rng.normal(size=(3, 4)) * 0.1, "large": rng.normal(size=(5, 6)) * 10.0,
           "vector": rng.normal(size=(7,)) * 3.0}
  clipped, _ = optim.clip_per_parameter(MAX_NORM).update(
      jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), optax.EmptyState())
  norms = []
  for name, g in grads.items():
    norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    norms.append(norm)
    expected = g * min(1.0, MAX_NORM / (norm + 1e-6))
    np.testing.assert_allclose(np.asarray(clipped[name]), expected, rtol=1e-5)
  assert min(norms) < MAX_NORM < max(norms)  # both cases occur
  # Per tensor, not global: the small gradient is left as it is although the total norm is large.
  np.testing.assert_allclose(np.asarray(clipped["small"]), grads["small"], rtol=1e-6)


def test_update_needs_the_schedule_inputs():
  optimizer, schedule = make()
  params = params_like(np.random.default_rng(4))
  with pytest.raises(ValueError, match="last_layer_frozen"):
    optimizer.update(params, optimizer.init(params), params,
                     lr=schedule.learning_rate(0), weight_decay=schedule.weight_decay(0))


def test_the_last_layer_follows_the_frozen_input_not_the_step():
  """The freeze is an input: the same update frozen and thawed; nothing counts steps inside."""
  rng = np.random.default_rng(5)
  optimizer, schedule = make()
  params = params_like(rng)
  grads = gradients(rng, params)
  update = jax.jit(optimizer.update)
  inputs = schedule.at(FREEZE_STEPS)  # thawed
  thawed, _ = update(grads, optimizer.init(params), params, **inputs)
  frozen, state = update(grads, optimizer.init(params), params,
                         **dict(inputs, last_layer_frozen=np.bool_(True)))
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(split(frozen)[1]))
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(split(thawed)[1]))
  assert_trees_close(split(frozen)[0], split(thawed)[0])
  # The frozen layer's Adam state did not start: thawing next gives the fresh AdamW's update.
  again, _ = update(grads, state, params, **inputs)
  assert_trees_close(split(again)[1], split(thawed)[1])
