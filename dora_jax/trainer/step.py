"""One DoRA (or DINO) update as a pure function: docs/DESIGN.md steps 2-8.

The train state is one pytree (a dict) that orbax saves whole:

  step        int32 scalar, the number of updates done
  student     nnx.State of the student's parameters (backbone + head)
  teacher     nnx.State of the teacher's parameters (an EMA of the student)
  constants   nnx.State of non-trainable model variables (may be empty)
  opt_state   the optax state of the student's optimiser
  center      (K,) float32, the EMA of the teacher's mean output
  rng         PRNG key (raw uint32 key data) for the step's randomness

The model and the DoRA options come from the run's plan (`plan.TrainPlan`, the config's model,
dora and mesh sections parsed once); the loss temperatures and the optimizer from the config.
`make_train_step` returns `step(state, batch, schedule) -> (state, metrics)`; the trainer jits it
with shardings and donation. `schedule` holds the step's learning rate, weight decay, teacher
momentum and temperature (f32 scalars) and whether the head's last layer is frozen (bool), which
the host computes (`schedules.Schedules.at`): the compiled step knows no run length, so a run
extended on the same work folder loads it from the persistent cache. Batches are uint8 and are
normalised here, on the device.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dora_jax import losses
from dora_jax.models import dino
from dora_jax.models import vit
from dora_jax import objects
from dora_jax.trainer import optim
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules as schedules_lib

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]
Schedule = dict[str, Any]  # `schedules.Schedules.at(step)`: NumPy or jax scalars.


def build_model(plan: plan_lib.TrainPlan, rngs: nnx.Rngs) -> dino.DinoModel:
  """The student/teacher architecture (backbone + DINO head) of the plan."""
  return dino.build_model(plan.model, img_size=plan.image_size, rngs=rngs)


def init_train_state(config, plan: plan_lib.TrainPlan, *,
                     rng: jax.Array) -> tuple[nnx.GraphDef, TrainState]:
  """Fresh state: student initialised from `rng`, teacher a copy of it, zero centre.

  The initialisation runs as one compiled program (eagerly, each parameter shape would compile
  its own), and works under `jax.eval_shape` (the trainer plans shardings with that).
  """
  graphdefs = []

  def init(rng: jax.Array) -> TrainState:
    init_rng, step_rng = jax.random.split(rng)
    model = build_model(plan, nnx.Rngs(params=init_rng))
    graphdef, params, constants = dino.split_model(model)
    graphdefs.append(graphdef)
    return {
        "step": jnp.zeros((), jnp.int32),
        "student": params,
        "teacher": jax.tree.map(jnp.copy, params),
        "constants": constants,
        "opt_state": optim.make_optimizer(config).init(params),
        "center": jnp.zeros((plan.model.out_dim,), jnp.float32),
        "rng": step_rng,
    }

  state = jax.jit(init)(rng)
  return graphdefs[-1], state


def _check_batch(batch: Batch) -> None:
  frames = batch.get("frames")
  if frames is None or frames.ndim != 5 or frames.shape[-1] != 3:
    raise ValueError(
        "batch['frames'] must be uint8 (B, T, H, W, 3) global views; got "
        f"{None if frames is None else tuple(frames.shape)}.")
  second = batch.get("second_frames")
  if second is not None and second.shape != frames.shape:
    raise ValueError(f"batch['second_frames'] must match batch['frames'] {tuple(frames.shape)}; "
                     f"got {tuple(second.shape)}.")
  crops = batch.get("crops")
  if crops is not None and (crops.ndim != 6 or crops.shape[:2] != frames.shape[:2]):
    raise ValueError(
        f"batch['crops'] must be (B, T, M, h, w, 3) matching batch['frames'] {frames.shape[:2]}; "
        f"got {tuple(crops.shape)}.")


def _local_crops(batch: Batch) -> jax.Array | None:
  """The batch's normalised local crops (B, T, M, h, w, 3), or None without any."""
  if "crops" not in batch or batch["crops"].shape[2] == 0:
    return None
  return vit.normalize_images(batch["crops"])


def _flat(x: jax.Array) -> jax.Array:
  """(..., H, W, 3) -> (prod(...), H, W, 3): views as one batch of images for the ViT."""
  return x.reshape((-1,) + x.shape[-3:])


# How the teacher's targets spread: per sample, and over the whole global batch (in the jitted,
# sharded step the batch axis is the global one, so XLA reduces across devices and hosts).
COLLAPSE_METRICS = ("teacher_entropy", "teacher_batch_entropy", "prototypes_used")


def collapse_metrics(probs: jax.Array) -> dict[str, jax.Array]:
  """The teacher's targets (..., K) -> 'teacher_entropy' (mean per-sample entropy, nats),
  'teacher_batch_entropy' (entropy of the batch-mean distribution, nats) and 'prototypes_used'
  (distinct argmax prototypes over the batch). One-prototype collapse: batch entropy ~0 and one
  prototype; uniform collapse: per-sample entropy ~log K."""
  return dict(teacher_entropy=losses.entropy(probs),
              teacher_batch_entropy=losses.batch_entropy(probs),
              prototypes_used=losses.prototypes_used(probs))


def compute_loss(config, dora: objects.DoraOptions | None, graphdef: nnx.GraphDef,
                 params: nnx.State, teacher_params: nnx.State, constants: nnx.State,
                 center: jax.Array, batch: Batch, teacher_temp: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DoRA loss of one batch (DINO's when `dora` is None), differentiable in `params` only.

  Teacher outputs, tracking and masks are under stop_gradient: the gradient with respect to
  `teacher_params` is exactly zero (tests check this).

  batch: 'frames' uint8 (B, T, H, W, 3) global views, 'crops' uint8 (B, T, M, h, w, 3) local
  crops (optional); for DINO also 'second_frames' (B, T, H, W, 3), the second global crops.

  aux: 'teacher_logits' (B, T, K) for DoRA, (B, T, G, K) for DINO (the centre averages them
  all), 'kl', 'masked_area', 'object_overlap' (0 for DINO) and the teacher's `COLLAPSE_METRICS`
  (see `collapse_metrics`).
  """
  _check_batch(batch)
  teacher = nnx.merge(graphdef, teacher_params, constants)
  student = nnx.merge(graphdef, params, constants)
  if dora is None:
    return _dino_loss(config, teacher, student, center, batch, teacher_temp, key)
  if "second_frames" in batch:
    raise ValueError("DoRA takes one global view per frame, but the batch has "
                     "'second_frames' (data.global_crops_per_frame=2 is DINO's).")
  frames = vit.normalize_images(batch["frames"])  # (B, T, H, W, 3)
  batch_size, frames_per_clip = frames.shape[:2]
  track_key, masked_key, local_key = jax.random.split(key, 3)

  teacher_logits, teacher_out = teacher(_flat(frames))
  teacher_logits = jax.lax.stop_gradient(teacher_logits).reshape(
      batch_size, frames_per_clip, -1)  # (B, T, K)
  probs = losses.teacher_targets(teacher_logits, center, teacher_temp)

  found = objects.object_views(dora, teacher_out, frames, track_key)
  views = found["views"]  # (B, T, V, H, W, 3)
  num_views = views.shape[2]

  crops = _local_crops(batch)
  if crops is None:
    masked_logits, _ = student(_flat(views), drop_path_rng=masked_key)
    local_logits = None
  else:
    masked_logits, local_logits = student.multi_crop([_flat(views), _flat(crops)],
                                                     [masked_key, local_key])
    local_logits = local_logits.reshape(crops.shape[:3] + (-1,))
  masked_logits = masked_logits.reshape(batch_size, frames_per_clip, num_views, -1)
  loss = losses.dino_loss(probs, masked_logits, local_logits,
                          student_temp=config.loss.student_temp)
  aux = dict(
      teacher_logits=teacher_logits,
      kl=losses.kl_divergence(probs[:, :, None], jax.lax.stop_gradient(masked_logits),
                              config.loss.student_temp),
      masked_area=1.0 - jnp.mean(found["visible"]),
      object_overlap=objects.object_overlap(found["masks"]),
      **collapse_metrics(probs),
  )
  return loss, aux


def _dino_loss(config, teacher: dino.DinoModel, student: dino.DinoModel, center: jax.Array,
               batch: Batch, teacher_temp: jax.Array,
               key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINO: every frame an image; the teacher sees its G global crops, the student all its views.

  The loss is `losses.dino_multicrop_loss`: the mean over (teacher global i, student view j)
  pairs with j != i (with G = 1, the teacher's one view against the local crops only).
  """
  global_views = [batch["frames"]] + ([batch["second_frames"]] if "second_frames" in batch else [])
  global_views = vit.normalize_images(jnp.stack(global_views, axis=2))  # (B, T, G, H, W, 3)
  leading = global_views.shape[:3]
  global_key, local_key = jax.random.split(key)

  teacher_logits, _ = teacher(_flat(global_views))
  teacher_logits = jax.lax.stop_gradient(teacher_logits).reshape(leading + (-1,))  # (B, T, G, K)
  probs = losses.teacher_targets(teacher_logits, center, teacher_temp)

  crops = _local_crops(batch)
  if crops is None:
    student_logits, _ = student(_flat(global_views), drop_path_rng=global_key)
    student_logits = student_logits.reshape(leading + (-1,))  # (B, T, G, K)
  else:
    global_logits, local_logits = student.multi_crop([_flat(global_views), _flat(crops)],
                                                     [global_key, local_key])
    student_logits = jnp.concatenate(
        [global_logits.reshape(leading + (-1,)), local_logits.reshape(crops.shape[:3] + (-1,))],
        axis=2)  # (B, T, G+M, K)
  loss = losses.dino_multicrop_loss(probs, student_logits, student_temp=config.loss.student_temp)
  collapse = collapse_metrics(probs)
  zero = jnp.zeros((), jnp.float32)
  # Every teacher view is in the same number of pairs, so loss - entropy is the mean KL over them.
  aux = dict(teacher_logits=teacher_logits,
             kl=jax.lax.stop_gradient(loss) - collapse["teacher_entropy"], masked_area=zero,
             object_overlap=zero, **collapse)
  return loss, aux


def make_train_step(config, plan: plan_lib.TrainPlan, graphdef: nnx.GraphDef
                    ) -> Callable[[TrainState, Batch, Schedule], tuple[TrainState, dict]]:
  """The pure update `step(state, batch, schedule) -> (state, metrics)` for this config and plan.

  schedule: `schedules.Schedules.at(step)` of the state's step, f32 scalars (lr, weight_decay,
    teacher_momentum, teacher_temp) and the bool last_layer_frozen; the metrics echo the four.
  """
  optimizer = optim.make_optimizer(config)
  dora = plan.masking

  def step(state: TrainState, batch: Batch,
           schedule: Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
    rng, step_key = jax.random.split(state["rng"])
    teacher_temp = schedule[schedules_lib.TEACHER_TEMP]
    grad_fn = jax.value_and_grad(
        lambda p: compute_loss(config, dora, graphdef, p, state["teacher"], state["constants"],
                               state["center"], batch, teacher_temp, step_key),
        has_aux=True)
    (loss, aux), grads = grad_fn(state["student"])

    # The optimizer keeps the head's last layer frozen for the first epoch(s) (see optim.py).
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["student"],
                                          **schedule)
    params = optax.apply_updates(state["student"], updates)

    momentum = schedule[schedules_lib.TEACHER_MOMENTUM]
    teacher = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                           state["teacher"], params)
    center = losses.update_center(state["center"], aux["teacher_logits"],
                                  config.loss.center_momentum)
    new_state = dict(state, step=state["step"] + 1, student=params, teacher=teacher,
                     opt_state=opt_state, center=center, rng=rng)
    metrics = dict(
        loss=loss,
        **{name: schedule[name] for name in schedules_lib.SCALARS},
        **{name: aux[name] for name in COLLAPSE_METRICS},
        kl=aux["kl"],
        masked_area=aux["masked_area"],
        object_overlap=aux["object_overlap"],
        grad_norm=optax.tree.norm(grads),
    )
    return new_state, metrics

  return step


def make_visualize_fn(plan: plan_lib.TrainPlan,
                      graphdef: nnx.GraphDef) -> Callable[..., dict[str, jax.Array]]:
  """`fn(state, batch, rng)` -> what the teacher tracks in clip 0 of the batch (see
  `objects.picture_arrays`); the DINO baseline's teacher is shown tracking too."""

  def visualize(state: TrainState, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    teacher = nnx.merge(graphdef, state["teacher"], state["constants"])
    return objects.picture_arrays(plan.dora, teacher.backbone, batch["frames"][:1], rng)

  return visualize


def abstract_train_state(config, plan: plan_lib.TrainPlan) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state as jax.ShapeDtypeStructs): the shapes, with nothing allocated."""
  graphdefs = []

  def init_state(rng):
    graphdef, state = init_train_state(config, plan, rng=rng)
    graphdefs.append(graphdef)
    return state

  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  return graphdefs[0], abstract_state


def teacher_backbone(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The teacher's ViT of a train state, as a module callable on images."""
  return dino.backbone_of(graphdef, state["teacher"], state["constants"])
