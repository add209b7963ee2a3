"""The student's optimizer (DESIGN.md step 8): per-tensor gradient clip, then AdamW.

The learning rate and the weight decay are the run's schedules of the GLOBAL step, one for all
parameters as in the reference. Weight decay applies to weight matrices and tokens and to the
head's weight-norm gain, never to biases and normalisation scales (`decays`).

The head's last layer is frozen for the first `optim.freeze_last_layer_epochs`. The reference
leaves its gradient at None then, so PyTorch's AdamW skips it: no update, no weight decay, and its
Adam moments and bias-correction count start when it unfreezes. Here the last layer has its own
AdamW state, untouched until the global step reaches `Schedules.freeze_last_layer_steps`; the
other parameters' AdamW runs from step 0. (Zeroing the gradient instead would let Adam's count run
on with zero moments and inflate the first updates after unfreezing 2-5x.)

  optimizer = make_optimizer(config, schedule)
  opt_state = optimizer.init(params)
  updates, opt_state = optimizer.update(grads, opt_state, params, step=global_step)
"""
import jax
import jax.numpy as jnp
import optax

from dora_jax.trainer import schedules as schedules_lib

BODY, LAST_LAYER = "body", "last_layer"
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # PyTorch's AdamW defaults, as the reference.


def is_last_layer(path) -> bool:
  """Whether a parameter (by its pytree path) belongs to the DINO head's last layer."""
  return "last_layer" in jax.tree_util.keystr(path)


def decays(path, param) -> bool:
  """Whether weight decay applies to a parameter: ndim > 1, or the head's weight-norm gain."""
  # The reference stores the head's weight-norm gain as (out_dim, 1), so its 1-D rule decays it;
  # ours is (out_dim,) and is named here to keep the reference's behaviour.
  return param.ndim > 1 or "last_layer_g" in jax.tree_util.keystr(path)


def clip_per_parameter(max_norm: float) -> optax.GradientTransformation:
  """Scales each parameter's gradient to norm <= max_norm (the reference clips per tensor)."""

  def clip(updates, params=None):
    del params

    def one(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

    return jax.tree.map(one, updates)

  return optax.stateless(clip)


def _add_decayed_weights(weight_decay: schedules_lib.Schedule) -> optax.GradientTransformation:
  """g + weight_decay(step) * p on the parameters that `decays`, with `step` the global step."""

  def update(updates, state, params=None, *, step, **extra_args):
    del extra_args
    rate = weight_decay(step)
    one = lambda path, g, p: g + rate.astype(g.dtype) * p if decays(path, p) else g
    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _scale_by_learning_rate(learning_rate: schedules_lib.Schedule) -> optax.GradientTransformation:
  """-learning_rate(step) * g, with `step` the global step."""

  def update(updates, state, params=None, *, step, **extra_args):
    del params, extra_args
    rate = -learning_rate(step)
    return jax.tree.map(lambda g: g * rate.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _frozen_until(inner: optax.GradientTransformation,
                  first_step: int) -> optax.GradientTransformation:
  """`inner` from global step `first_step` on; before it zero updates and `inner`'s state kept."""

  def update(updates, state, params=None, *, step, **extra_args):
    new_updates, new_state = inner.update(updates, state, params, step=step, **extra_args)
    frozen = step < first_step
    new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_state = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state, new_state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(config, schedule: schedules_lib.Schedules) -> optax.GradientTransformation:
  """The student's optimizer; its `update` needs `step=`, the global step (int32 scalar).

  Args:
    config: the run config (reads `optim.clip_grad_norm`).
    schedule: the run's schedules (learning rate, weight decay, freeze_last_layer_steps).
  """
  max_norm = float(config.optim.clip_grad_norm or 0.0)

  def adamw() -> optax.GradientTransformation:
    clip = [clip_per_parameter(max_norm)] if max_norm > 0 else []
    return optax.chain(
        *clip,
        optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
        _add_decayed_weights(schedule.weight_decay),
        _scale_by_learning_rate(schedule.learning_rate),
    )

  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: LAST_LAYER if is_last_layer(path) else BODY, params)
  partitioned = optax.partition(
      {BODY: adamw(), LAST_LAYER: _frozen_until(adamw(), schedule.freeze_last_layer_steps)},
      labels)

  def update(updates, state, params=None, *, step=None, **extra_args):
    if step is None:
      raise ValueError("`step` (the global step) is required: optimizer.update(grads, opt_state, "
                       "params, step=step).")
    return partitioned.update(updates, state, params, step=jnp.asarray(step, jnp.int32),
                              **extra_args)

  return optax.GradientTransformationExtraArgs(partitioned.init, update)
