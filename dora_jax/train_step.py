"""One DoRA (or DINO) update as a pure function: DESIGN.md steps 2-8.

The train state is one pytree (a dict) that orbax saves whole:

  step        int32 scalar, the number of updates done
  student     nnx.State of the student's parameters (backbone + head)
  teacher     nnx.State of the teacher's parameters (an EMA of the student)
  constants   nnx.State of non-trainable model variables (may be empty)
  opt_state   the optax state of the student's optimiser
  center      (K,) float32, the EMA of the teacher's mean output
  rng         PRNG key (raw uint32 key data) for the step's randomness

`make_train_step` returns `step(state, batch) -> (state, metrics)`; the trainer jits it with
shardings and donation. Batches are uint8 and are normalised here, on the device.
"""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dora_jax import losses
from dora_jax import optim
from dora_jax import schedules as schedules_lib
from dora_jax import tracking
from dora_jax import models

# ImageNet statistics, as the public DINO/DoRA weights expect.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]


def normalize(images: jax.Array) -> jax.Array:
  """uint8 (..., 3) -> float32 normalised with the ImageNet mean and std."""
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(PIXEL_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def _mask_threshold(config) -> str | float:
  value = config.dora.mask_threshold
  if isinstance(value, str) and value != "mean":
    try:
      return float(value)
    except ValueError:
      raise ValueError(
          f"config key `dora.mask_threshold` must be 'mean' or a number; got {value!r}.") from None
  return value


def build_model(config, rngs: nnx.Rngs) -> nnx.Module:
  """The student/teacher architecture (backbone + DINO head) of the config."""
  return models.build_model(config.model, img_size=config.data.global_size, rngs=rngs)


def init_train_state(config, *, rng: jax.Array, steps_per_epoch: int,
                     total_steps: int) -> tuple[nnx.GraphDef, TrainState]:
  """Fresh state: student initialised from `rng`, teacher a copy of it, zero centre.

  The initialisation runs as one compiled program (eagerly, each parameter shape would compile
  its own), and works under `jax.eval_shape` (the trainer plans shardings with that).
  """
  schedule = schedules_lib.make_schedules(
      config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  graphdefs = []

  def init(rng: jax.Array) -> TrainState:
    init_rng, step_rng = jax.random.split(rng)
    model = build_model(config, nnx.Rngs(params=init_rng))
    graphdef, params, constants = nnx.split(model, nnx.Param, ...)
    graphdefs.append(graphdef)
    return {
        "step": jnp.zeros((), jnp.int32),
        "student": params,
        "teacher": jax.tree.map(jnp.copy, params),
        "constants": constants,
        "opt_state": optim.make_optimizer(config, schedule).init(params),
        "center": jnp.zeros((config.model.out_dim,), jnp.float32),
        "rng": step_rng,
    }

  state = jax.jit(init)(rng)
  return graphdefs[-1], state


def _check_batch(config, batch: Batch) -> None:
  frames = batch.get("frames")
  if frames is None or frames.ndim != 5 or frames.shape[-1] != 3:
    raise ValueError(
        "batch['frames'] must be uint8 (B, T, H, W, 3) global views; got "
        f"{None if frames is None else tuple(frames.shape)}.")
  if frames.shape[1] < 2 and config.dora.enabled:
    raise ValueError(
        f"batch['frames'] has T={frames.shape[1]} frames per clip; DoRA tracks objects from the "
        "anchor into other frames and needs T >= 2 (config key `data.frames_per_clip`).")
  crops = batch.get("crops")
  if crops is not None and (crops.ndim != 6 or crops.shape[:2] != frames.shape[:2]):
    raise ValueError(
        f"batch['crops'] must be (B, T, M, h, w, 3) matching batch['frames'] {frames.shape[:2]}; "
        f"got {tuple(crops.shape)}.")


def object_views(config, teacher_out: dict[str, jax.Array], frames: jax.Array,
                 key: jax.Array) -> dict[str, jax.Array]:
  """Discover, refine, track and mask (DESIGN.md steps 3-6) from the teacher's outputs.

  Args:
    teacher_out: the backbone dict of the teacher on frames reshaped to (B*T, H, W, 3).
    frames: (B, T, H, W, 3) normalised frames.
    key: PRNG key for the head pick and the removed objects.

  Returns dict: prototypes (B, k, d), plan (B, k, N), heatmaps (B, T, k, N), masks
    (B, T, k, H, W) bool, views (B, T, V, H, W, 3), visible (B, T, V, H, W).
  """
  batch, frames_per_clip, height, width, _ = frames.shape
  per_clip = lambda x: jax.lax.stop_gradient(x).reshape((batch, frames_per_clip) + x.shape[1:])
  attn, queries, keys = (per_clip(teacher_out[name]) for name in ("attn", "q", "k"))
  tokens = per_clip(teacher_out["tokens"])  # (B, T, N, D)
  num_patches = tokens.shape[2]
  patch = int(round(math.sqrt(height * width / num_patches)))
  heads_key, objects_key = jax.random.split(key)
  prototypes = tracking.discover(attn[:, 0], queries[:, 0], heads_key,
                                 num_objects=config.dora.num_objects)
  refined, plan = tracking.refine(prototypes, tokens[:, 0], epsilon=config.dora.sinkhorn_epsilon,
                                  num_iters=config.dora.sinkhorn_iters)
  heatmaps = tracking.track(refined, tracking.concat_heads(keys[:, :, :, 1:]))
  masks = tracking.object_masks(heatmaps, grid_size=(height // patch, width // patch),
                                image_size=(height, width), threshold=_mask_threshold(config))
  views, visible = tracking.apply_masks(frames, masks, objects_key, mode=config.dora.mask_mode)
  return dict(prototypes=refined, plan=plan, heatmaps=heatmaps, masks=masks, views=views,
              visible=visible)


def object_overlap(masks: jax.Array) -> jax.Array:
  """Mean IoU between the masks of different objects (B, T, k, H, W) -> scalar.

  Near 1 while the teacher's heads still attend alike (early in training, or a model too small
  to have learned it): then the k objects coincide. It falls as discovery finds distinct objects.
  """
  num_objects = masks.shape[2]
  if num_objects < 2:
    return jnp.zeros((), jnp.float32)
  flat = masks.reshape(masks.shape[:3] + (-1,)).astype(jnp.float32)  # (B, T, k, P)
  intersection = jnp.einsum("btip,btjp->btij", flat, flat)
  area = jnp.diagonal(intersection, axis1=-2, axis2=-1)  # (B, T, k)
  union = area[..., :, None] + area[..., None, :] - intersection
  iou = intersection / jnp.maximum(union, 1.0)
  pairs = jnp.triu(jnp.ones((num_objects, num_objects), bool), k=1)
  return jnp.sum(jnp.where(pairs, iou, 0.0)) / (iou.shape[0] * iou.shape[1] * jnp.sum(pairs))


def compute_loss(config, graphdef: nnx.GraphDef, params: nnx.State, teacher_params: nnx.State,
                 constants: nnx.State, center: jax.Array, batch: Batch, teacher_temp: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DoRA loss of one batch, differentiable in `params` only.

  Teacher outputs, tracking and masks are under stop_gradient: the gradient with respect to
  `teacher_params` is exactly zero (tests check this).
  """
  _check_batch(config, batch)
  frames = normalize(batch["frames"])  # (B, T, H, W, 3)
  batch_size, frames_per_clip = frames.shape[:2]
  flat = lambda x: x.reshape((-1,) + x.shape[-3:])
  track_key, masked_key, local_key = jax.random.split(key, 3)

  teacher = nnx.merge(graphdef, teacher_params, constants)
  teacher_logits, teacher_out = teacher(flat(frames))
  teacher_logits = jax.lax.stop_gradient(teacher_logits).reshape(
      batch_size, frames_per_clip, -1)  # (B, T, K)
  probs = losses.teacher_targets(teacher_logits, center, teacher_temp)

  aux = {}
  if config.dora.enabled:
    dora = object_views(config, teacher_out, frames, track_key)
    views = jax.lax.stop_gradient(dora["views"])  # (B, T, V, H, W, 3)
    aux["masked_area"] = 1.0 - jnp.mean(dora["visible"])
    aux["object_overlap"] = object_overlap(dora["masks"])
  else:
    views = frames[:, :, None]
    aux["masked_area"] = jnp.zeros((), jnp.float32)
    aux["object_overlap"] = jnp.zeros((), jnp.float32)
  num_views = views.shape[2]

  student = nnx.merge(graphdef, params, constants)
  masked_logits, _ = student(flat(views), drop_path_rng=masked_key)
  masked_logits = masked_logits.reshape(batch_size, frames_per_clip, num_views, -1)
  local_logits = None
  if "crops" in batch and batch["crops"].shape[2] > 0:
    crops = normalize(batch["crops"])  # (B, T, M, h, w, 3)
    local_logits, _ = student(flat(crops), drop_path_rng=local_key)
    local_logits = local_logits.reshape(crops.shape[:3] + (-1,))
  loss = losses.dino_loss(probs, masked_logits, local_logits,
                          student_temp=config.loss.student_temp)
  aux.update(
      teacher_logits=teacher_logits,
      teacher_entropy=losses.entropy(probs),
      kl=losses.kl_divergence(probs[:, :, None], jax.lax.stop_gradient(masked_logits),
                              config.loss.student_temp),
  )
  return loss, aux


def make_train_step(config, graphdef: nnx.GraphDef, *, steps_per_epoch: int,
                    total_steps: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure update `step(state, batch) -> (state, metrics)` for this config and run length."""
  schedule = schedules_lib.make_schedules(
      config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  optimizer = optim.make_optimizer(config, schedule)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    rng, step_key = jax.random.split(state["rng"])
    teacher_temp = schedule.teacher_temp(state["step"])
    grad_fn = jax.value_and_grad(
        lambda p: compute_loss(config, graphdef, p, state["teacher"], state["constants"],
                               state["center"], batch, teacher_temp, step_key),
        has_aux=True)
    (loss, aux), grads = grad_fn(state["student"])

    # The optimizer keeps the head's last layer frozen for the first epoch(s) (see optim.py).
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["student"],
                                          step=state["step"])
    params = optax.apply_updates(state["student"], updates)

    momentum = schedule.teacher_momentum(state["step"])
    teacher = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                           state["teacher"], params)
    center = losses.update_center(state["center"], aux["teacher_logits"],
                                  config.loss.center_momentum)
    new_state = dict(state, step=state["step"] + 1, student=params, teacher=teacher,
                     opt_state=opt_state, center=center, rng=rng)
    metrics = dict(
        loss=loss,
        lr=schedule.learning_rate(state["step"]),
        weight_decay=schedule.weight_decay(state["step"]),
        teacher_momentum=momentum,
        teacher_temp=teacher_temp,
        teacher_entropy=aux["teacher_entropy"],
        kl=aux["kl"],
        masked_area=aux["masked_area"],
        object_overlap=aux["object_overlap"],
        grad_norm=optax.tree.norm(grads),
    )
    return new_state, metrics

  return step


def make_visualize_fn(config, graphdef: nnx.GraphDef) -> Callable[..., dict[str, jax.Array]]:
  """`fn(state, batch, rng)` -> what the teacher tracks in clip 0 of the batch.

  Returns dict: frames (T, H, W, 3) uint8, heatmaps (T, k, H, W) float32 scaled to [0, 1] per map,
  masks (T, k, H, W) bool, masked_views (T, V, H, W, 3) uint8 (the student's views).
  """

  def visualize(state: TrainState, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    frames_u8 = batch["frames"][:1]
    frames = normalize(frames_u8)
    _, frames_per_clip, height, width, _ = frames.shape
    teacher = nnx.merge(graphdef, state["teacher"], state["constants"])
    _, teacher_out = teacher(frames.reshape((-1,) + frames.shape[2:]))
    dora = object_views(config, teacher_out, frames, rng)
    heat = dora["heatmaps"][0]  # (T, k, N)
    heat = heat / jnp.maximum(jnp.max(heat, axis=-1, keepdims=True), 1e-12)
    patch = int(round(math.sqrt(height * width / heat.shape[-1])))
    heat = heat.reshape(heat.shape[:2] + (height // patch, width // patch))
    heat = jnp.repeat(jnp.repeat(heat, patch, axis=-2), patch, axis=-1)
    unnormalized = (dora["views"][0] * jnp.asarray(PIXEL_STD) + jnp.asarray(PIXEL_MEAN)) * 255.0
    masked = jnp.where(dora["visible"][0][..., None] > 0, unnormalized, 0.0)
    return dict(
        frames=frames_u8[0],
        heatmaps=heat.astype(jnp.float32),
        masks=dora["masks"][0],
        masked_views=jnp.clip(jnp.round(masked), 0, 255).astype(jnp.uint8),
    )

  return visualize


def teacher_backbone(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The teacher's ViT (the encoder DoRA trains), as a module callable on images."""
  return nnx.merge(graphdef, state["teacher"], state["constants"]).backbone
