"""The student's optimizer (DESIGN.md step 8): per-tensor gradient clip, then AdamW.

The learning rate and the weight decay are inputs of each update, the run's schedules at the
GLOBAL step (`schedules.Schedules.at`), one for all parameters as in the reference: the
compiled step holds no run length. Weight decay applies to weight matrices and tokens and to the
head's weight-norm gain, never to biases and normalisation scales (`decays`).

The head's last layer is frozen for the first `optim.freeze_last_layer_epochs`. The reference
leaves its gradient at None then, so PyTorch's AdamW skips it: no update, no weight decay, and its
Adam moments and bias-correction count start when it unfreezes. Here the last layer has its own
AdamW state, untouched while the input `last_layer_frozen` is true; the other parameters' AdamW
runs from step 0. (Zeroing the gradient instead would let Adam's count run on with zero moments
and inflate the first updates after unfreezing 2-5x.)

  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  updates, opt_state = optimizer.update(grads, opt_state, params, **schedule.at(global_step))
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


def _add_decayed_weights() -> optax.GradientTransformation:
  """g + weight_decay * p on the parameters that `decays`; `weight_decay` an f32 scalar input."""

  def update(updates, state, params=None, **extra_args):
    rate = extra_args[schedules_lib.WEIGHT_DECAY]
    one = lambda path, g, p: g + rate.astype(g.dtype) * p if decays(path, p) else g
    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _scale_by_learning_rate() -> optax.GradientTransformation:
  """-lr * g; `lr` an f32 scalar input."""

  def update(updates, state, params=None, **extra_args):
    del params
    rate = -extra_args[schedules_lib.LEARNING_RATE]
    return jax.tree.map(lambda g: g * rate.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def _frozen_while_asked(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, but zero updates and `inner`'s state kept while the input `last_layer_frozen`."""

  def update(updates, state, params=None, **extra_args):
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    frozen = extra_args[schedules_lib.LAST_LAYER_FROZEN]
    new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_state = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state, new_state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(config) -> optax.GradientTransformation:
  """The student's optimizer; its `update` needs the schedule inputs of the global step as
  keywords (`**schedule.at(step)`: lr, weight_decay, last_layer_frozen; others are ignored).

  Args:
    config: the run config (reads `optim.clip_grad_norm`).
  """
  max_norm = float(config.optim.clip_grad_norm or 0.0)

  def adamw() -> optax.GradientTransformation:
    clip = [clip_per_parameter(max_norm)] if max_norm > 0 else []
    return optax.chain(
        *clip,
        optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
        _add_decayed_weights(),
        _scale_by_learning_rate(),
    )

  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: LAST_LAYER if is_last_layer(path) else BODY, params)
  partitioned = optax.partition(
      {BODY: adamw(), LAST_LAYER: _frozen_while_asked(adamw())}, labels)
  needed = (schedules_lib.LEARNING_RATE, schedules_lib.WEIGHT_DECAY,
            schedules_lib.LAST_LAYER_FROZEN)

  def update(updates, state, params=None, **extra_args):
    missing = [name for name in needed if name not in extra_args]
    if missing:
      raise ValueError(f"optimizer.update needs the schedule inputs {missing} as keywords: "
                       "optimizer.update(grads, opt_state, params, **schedule.at(step)).")
    inputs = {schedules_lib.LEARNING_RATE: jnp.asarray(extra_args[schedules_lib.LEARNING_RATE],
                                                       jnp.float32),
              schedules_lib.WEIGHT_DECAY: jnp.asarray(extra_args[schedules_lib.WEIGHT_DECAY],
                                                      jnp.float32),
              schedules_lib.LAST_LAYER_FROZEN: jnp.asarray(
                  extra_args[schedules_lib.LAST_LAYER_FROZEN], bool)}
    return partitioned.update(updates, state, params, **inputs)

  return optax.GradientTransformationExtraArgs(partitioned.init, update)
