"""Per-step schedules of the DINO/DoRA recipe (docs/DESIGN.md step 8), computed on the host.

The train step takes the values of its step as inputs (`Schedules.at`), as DINO indexes its
precomputed schedules: nothing that depends on the run's length is a constant of the compiled
program, so a run extended (a larger `total_steps` or `epochs` on the same work folder) loads
its compiled step from the persistent cache. The formulas are jnp float32 functions of the global
step, evaluated on the host's CPU by one small jitted program: the same float32 arithmetic the
step did when it computed them itself, so moving them out of the step changed no number.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# The step's inputs (`Schedules.at`), echoed in its metrics under the same names.
LEARNING_RATE = "lr"
WEIGHT_DECAY = "weight_decay"
TEACHER_MOMENTUM = "teacher_momentum"
TEACHER_TEMP = "teacher_temp"
LAST_LAYER_FROZEN = "last_layer_frozen"
SCALARS = (LEARNING_RATE, WEIGHT_DECAY, TEACHER_MOMENTUM, TEACHER_TEMP)  # The f32 ones.


def _cosine(start: float, end: float, progress: jax.Array) -> jax.Array:
  """start at progress 0, end at progress 1, half a cosine in between."""
  progress = jnp.clip(progress, 0.0, 1.0)
  return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class Schedules:
  """The recipe's schedules for one run length."""
  steps_per_epoch: int
  total_steps: int
  peak_lr: float  # base_lr * batch_size / 256
  warmup_steps: int
  min_lr: float
  weight_decay_start: float
  weight_decay_end: float
  momentum_start: float
  teacher_temp_start: float
  teacher_temp_end: float
  teacher_temp_warmup_epochs: int
  freeze_last_layer_steps: int

  def learning_rate(self, step) -> jax.Array:
    """Linear warm-up from 0 to the peak, then cosine to min_lr at total_steps."""
    step = jnp.asarray(step, jnp.float32)
    warm = self.peak_lr * step / max(self.warmup_steps, 1)
    decay_steps = max(self.total_steps - self.warmup_steps, 1)
    cosine = _cosine(self.peak_lr, self.min_lr, (step - self.warmup_steps) / decay_steps)
    return jnp.where(step < self.warmup_steps, warm, cosine).astype(jnp.float32)

  def weight_decay(self, step) -> jax.Array:
    """Cosine from weight_decay to weight_decay_end over the run."""
    progress = jnp.asarray(step, jnp.float32) / max(self.total_steps, 1)
    return _cosine(self.weight_decay_start, self.weight_decay_end, progress).astype(jnp.float32)

  def teacher_momentum(self, step) -> jax.Array:
    """Teacher EMA momentum: cosine from its start value to 1 over the run."""
    progress = jnp.asarray(step, jnp.float32) / max(self.total_steps, 1)
    return _cosine(self.momentum_start, 1.0, progress).astype(jnp.float32)

  def teacher_temp(self, step) -> jax.Array:
    """Linear warm-up per epoch (as the reference), then constant."""
    if self.teacher_temp_warmup_epochs <= 0:
      return jnp.float32(self.teacher_temp_end)
    epoch = jnp.asarray(step, jnp.int32) // self.steps_per_epoch
    # The reference's linspace(start, end, warmup_epochs): epoch warmup-1 reaches `end`.
    fraction = jnp.minimum(
        epoch.astype(jnp.float32) / max(self.teacher_temp_warmup_epochs - 1, 1), 1.0)
    return jnp.asarray(
        self.teacher_temp_start + fraction * (self.teacher_temp_end - self.teacher_temp_start),
        jnp.float32)

  def last_layer_frozen(self, step) -> jax.Array:
    """Whether the head's last layer is frozen at this step (the first epochs; see optim.py)."""
    return jnp.asarray(step, jnp.int32) < self.freeze_last_layer_steps

  def _all(self, step) -> dict[str, jax.Array]:
    return {
        LEARNING_RATE: self.learning_rate(step),
        WEIGHT_DECAY: self.weight_decay(step),
        TEACHER_MOMENTUM: self.teacher_momentum(step),
        TEACHER_TEMP: self.teacher_temp(step),
        LAST_LAYER_FROZEN: self.last_layer_frozen(step),
    }

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self._all)

  def at(self, step: int) -> dict[str, np.ndarray]:
    """The train step's schedule inputs for global step `step` (before its update), computed on
    the host's CPU: float32 scalars, and the boolean `last_layer_frozen`."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return jax.device_get(self._jitted(np.int32(step)))


def make_schedules(config, *, steps_per_epoch: int, total_steps: int) -> Schedules:
  """Builds the schedules from the config's `optim`, `loss` and `batch_size` keys."""
  if steps_per_epoch < 1 or total_steps < 1:
    raise ValueError(
        f"steps_per_epoch ({steps_per_epoch}) and total_steps ({total_steps}) must be >= 1.")
  optim = config.optim
  return Schedules(
      steps_per_epoch=int(steps_per_epoch),
      total_steps=int(total_steps),
      peak_lr=optim.base_lr * config.batch_size / 256.0,
      warmup_steps=min(int(round(optim.warmup_epochs * steps_per_epoch)), int(total_steps)),
      min_lr=optim.min_lr,
      weight_decay_start=optim.weight_decay,
      weight_decay_end=optim.weight_decay_end,
      momentum_start=optim.teacher_momentum,
      teacher_temp_start=config.loss.warmup_teacher_temp,
      teacher_temp_end=config.loss.teacher_temp,
      teacher_temp_warmup_epochs=int(config.loss.warmup_teacher_temp_epochs),
      freeze_last_layer_steps=int(round(optim.freeze_last_layer_epochs * steps_per_epoch)),
  )

