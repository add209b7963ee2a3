"""DoRA's object-aware views: discover -> refine -> track -> mask, from the teacher's outputs.

`DoraOptions` is `config.dora` parsed and checked once, before anything compiles; the numerics
receive it, never the whole config. Its defaults are read from config_base.py; training and the
tracking evaluation (`evaluation.track.TrackSettings.dora`) both hold one. `object_views` chains
the kernels of `tracking.py` (docs/DESIGN.md steps 3-6); `object_overlap` measures whether the
discovered objects are distinct.
"""
from __future__ import annotations

import dataclasses
import math
import typing

import jax
import jax.numpy as jnp

from dora_jax import config_base
from dora_jax.models import vit
from dora_jax import tracking

MASK_MODES = typing.get_args(tracking.MaskMode)
_DEFAULTS = config_base.get_base_config().dora


@dataclasses.dataclass(frozen=True)
class DoraOptions:
  """The settings of the object-aware views: `config.dora` (config_base.py says what each is
  and holds the defaults)."""
  num_objects: int = _DEFAULTS.num_objects
  sinkhorn_iters: int = _DEFAULTS.sinkhorn_iters
  sinkhorn_epsilon: float = _DEFAULTS.sinkhorn_epsilon
  mask_mode: str = _DEFAULTS.mask_mode
  mask_threshold: str | float = _DEFAULTS.mask_threshold

  @property
  def heads_per_batch(self) -> bool:
    """Whether one draw of k heads serves the whole batch: with the public code's batch-coupled
    cut ("batch_mean"), as the public code draws them, so that object i of every clip comes
    from the same head; otherwise each clip draws its own."""
    return self.mask_threshold == "batch_mean"

  @classmethod
  def from_config(cls, dora_config, *, num_heads: int) -> "DoraOptions":
    """Parses and checks `config.dora` against a model with `num_heads` heads.

    Raises:
      ValueError: one line naming the `dora.*` key that is wrong and what it must be.
    """
    num_objects = int(dora_config.num_objects)
    if not 1 <= num_objects <= num_heads:
      raise ValueError(
          f"config dora.num_objects={num_objects}: must be between 1 and the {num_heads} "
          "attention heads of the model (one head per object).")
    if dora_config.mask_mode not in MASK_MODES:
      raise ValueError(f"config dora.mask_mode={dora_config.mask_mode!r}: expected one of "
                       f"{', '.join(repr(m) for m in MASK_MODES)}.")
    if int(dora_config.sinkhorn_iters) < 1:
      raise ValueError(f"config dora.sinkhorn_iters={dora_config.sinkhorn_iters}: must be >= 1.")
    if not float(dora_config.sinkhorn_epsilon) > 0:
      raise ValueError(
          f"config dora.sinkhorn_epsilon={dora_config.sinkhorn_epsilon}: must be > 0.")
    return cls(num_objects=num_objects, sinkhorn_iters=int(dora_config.sinkhorn_iters),
               sinkhorn_epsilon=float(dora_config.sinkhorn_epsilon),
               mask_mode=str(dora_config.mask_mode),
               mask_threshold=parse_threshold(dora_config.mask_threshold))


def parse_threshold(value) -> str | float:
  """'mean' (or another named rule of `tracking.object_masks`) or a number, maybe as a string."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  try:
    return float(value)
  except (TypeError, ValueError):
    pass
  if value not in tracking.THRESHOLD_RULES:
    raise ValueError(f"config dora.mask_threshold={value!r}: expected a number or one of "
                     f"{', '.join(repr(r) for r in tracking.THRESHOLD_RULES)}.")
  return str(value)


def track_objects(options: DoraOptions, teacher_out: dict[str, jax.Array],
                  clip_shape: tuple[int, int, int, int], key: jax.Array) -> dict[str, jax.Array]:
  """Discover, refine, track and binarise (docs/DESIGN.md steps 3-6) from the teacher's outputs.

  Args:
    options: the parsed `config.dora`.
    teacher_out: the backbone dict of the teacher on the frames reshaped to (B*T, H, W, 3):
      `attn` (B*T, h, N+1, N+1), `q`, `k` (B*T, h, N+1, d_head), `tokens` (B*T, N, D).
    clip_shape: (B, T, H, W); frame 0 of each clip is the anchor.
    key: PRNG key for the head pick (per clip, or once for the batch: `heads_per_batch`).

  Returns dict (no gradient): heads (B, k) int32 the heads that discovered the objects,
    prototypes (B, k, d) refined, plan (B, k, N), heatmaps (B, T, k, N), masks (B, T, k, H, W)
    bool.
  """
  batch, frames_per_clip, height, width = clip_shape
  per_clip = lambda x: jax.lax.stop_gradient(x).reshape((batch, frames_per_clip) + x.shape[1:])
  attn, queries, keys = (per_clip(teacher_out[name]) for name in ("attn", "q", "k"))
  tokens = per_clip(teacher_out["tokens"])  # (B, T, N, D)
  patch = int(round(math.sqrt(height * width / tokens.shape[2])))
  heads = tracking.choose_heads(key, batch, attn.shape[2], options.num_objects,
                               per_batch=options.heads_per_batch)
  prototypes = tracking.discover(attn[:, 0], queries[:, 0], None, num_objects=options.num_objects,
                                 heads=heads)
  refined, plan = tracking.refine(prototypes, tokens[:, 0], epsilon=options.sinkhorn_epsilon,
                                  num_iters=options.sinkhorn_iters)
  heatmaps = tracking.track(refined, tracking.concat_heads(keys[:, :, :, 1:]))
  masks = tracking.object_masks(heatmaps, grid_size=(height // patch, width // patch),
                                image_size=(height, width), threshold=options.mask_threshold)
  return dict(heads=heads, prototypes=refined, plan=plan, heatmaps=heatmaps, masks=masks)


def object_views(options: DoraOptions, teacher_out: dict[str, jax.Array], frames: jax.Array,
                 key: jax.Array) -> dict[str, jax.Array]:
  """The student's object-aware views (docs/DESIGN.md steps 3-6) from the teacher's outputs.

  Args:
    options: the parsed `config.dora`.
    teacher_out: the backbone dict of the teacher on the frames reshaped to (B*T, H, W, 3)
      (see `track_objects`).
    frames: (B, T, H, W, 3) normalised frames; frame 0 of each clip is the anchor.
    key: PRNG key for the head pick and the removed objects.

  Returns dict: those of `track_objects`, and views (B, T, V, H, W, 3), visible (B, T, V, H, W);
    all without gradient.
  """
  heads_key, objects_key = jax.random.split(key)
  found = track_objects(options, teacher_out, frames.shape[:4], heads_key)
  views, visible = tracking.apply_masks(frames, found["masks"], objects_key,
                                        mode=options.mask_mode)
  return dict(found, views=jax.lax.stop_gradient(views), visible=visible)


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


def picture_arrays(options: DoraOptions, backbone, frames_u8: jax.Array,
                   key: jax.Array) -> dict[str, jax.Array]:
  """What a teacher backbone tracks in one clip, as arrays for `visualize.make_picture`.

  Args:
    options: the parsed `config.dora`.
    backbone: a `models.vit.VisionTransformer` (the teacher's), called without drop path.
    frames_u8: (1, T, H, W, 3) uint8 frames of one clip, frame 0 the anchor.
    key: PRNG key for the head pick and the removed objects.

  Returns dict: frames (T, H, W, 3) uint8, heatmaps (T, k, H, W) float32 scaled to [0, 1] per
    map, masks (T, k, H, W) bool, masked_views (T, V, H, W, 3) uint8 (the student's views).
  """
  frames = vit.normalize_images(frames_u8)
  _, _, height, width, _ = frames.shape
  found = object_views(options, backbone(frames.reshape((-1,) + frames.shape[2:])), frames, key)
  heat = found["heatmaps"][0]  # (T, k, N)
  heat = heat / jnp.maximum(jnp.max(heat, axis=-1, keepdims=True), 1e-12)
  patch = int(round(math.sqrt(height * width / heat.shape[-1])))
  heat = heat.reshape(heat.shape[:2] + (height // patch, width // patch))
  heat = jnp.repeat(jnp.repeat(heat, patch, axis=-2), patch, axis=-1)
  masked = jnp.where(found["visible"][0][..., None] > 0,
                     vit.denormalize_images(found["views"][0]), 0.0)
  return dict(
      frames=frames_u8[0],
      heatmaps=heat.astype(jnp.float32),
      masks=found["masks"][0],
      masked_views=jnp.clip(jnp.round(masked), 0, 255).astype(jnp.uint8),
  )
