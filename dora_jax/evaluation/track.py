"""Tracking IoU: how well the DoRA kernels follow the real objects of the synthetic walking tour.

Clips of T frames (`frame_stride` apart) are cut from the tour at evenly spaced anchors. The
teacher's last block (attention, queries, keys) and patch tokens on the clip's frames go through
the DoRA kernels of `dora_jax.tracking` exactly as in training (discover k objects in the anchor
from k heads' [CLS] attention, refine with Sinkhorn, track into every frame, binarise). Each
tracked object is matched to the ground-truth object it overlaps best in the anchor frame (IoU),
and then followed: its IoU with that object's mask in every frame of the clip (1 where both are
empty). Reported: the mean IoU over clips, objects and frames (`track_iou`), and per frame offset
(offset 0 is discovery, later offsets show how the track holds).

Frames and masks are resized (bilinear / nearest) to a shorter side of `short_side` px with the
longer side rounded down to a multiple of `size_multiple` (the patch size or a multiple of it).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import os
from typing import Any, Callable, Mapping

import av
import jax
import numpy as np
from PIL import Image

from dora_jax.data import synthetic
from dora_jax.evaluation import features as features_lib
from dora_jax.evaluation import registry
from dora_jax import objects
from dora_jax import tracking

BACKBONE_OUTPUTS = ("attn", "q", "k", "tokens")
DEMO_TOUR = "demo"  # The `data` of a training run's own synthetic tour (data.synthetic).

# The evaluator's settings (config.evals.NAME keys, dora-eval track's flags). During pretraining
# 0, "" and -1 take the training config's value: the clips and the DoRA kernels as it trains them.
DEFAULTS = {
    "data": "",  # The synthetic tour (.mp4 beside .masks.npz, or its folder); "demo": the run's.
    "clips": 16,  # Clips anchored evenly over the tour.
    "frames_per_clip": 0,  # Frames per clip (0: data.frames_per_clip).
    "frame_stride": 0,  # Tour frames between a clip's frames (0: data.frame_stride).
    "short_side": 0,  # Shorter side of the frames the teacher sees (0: data.global_size).
    "size_multiple": 0,  # Longer side rounded down to a multiple of this (0: the patch size).
    "num_objects": 0,  # Objects discovered (0: dora.num_objects).
    "sinkhorn_iters": 0,  # (0: dora.sinkhorn_iters).
    "sinkhorn_epsilon": 0.0,  # (0: dora.sinkhorn_epsilon).
    "mask_threshold": "",  # A number, 'mean' or 'batch_mean' ("": dora.mask_threshold).
    "seed": -1,  # Picks the discovery heads (-1: config.seed).
    "batch_size": 32,  # Frames per forward pass.
}
REPORT_FILE = "track.json"
SCORES = ("track_iou", "track_iou_last")
DESCRIPTION = "Tracking IoU of the DoRA kernels on the synthetic walking tour."


class TourError(ValueError):
  """A tour that cannot be evaluated; the message is one line."""


@dataclasses.dataclass(frozen=True)
class TrackSettings:
  """The clips, and the DoRA kernels' settings as in training (their defaults: config_base's
  `dora` section). No defaults here: `Evaluator` makes them from the training config or from
  dora-eval's flags."""
  num_clips: int  # Clips, anchored evenly over the tour.
  frames_per_clip: int  # T: the anchor and T-1 frames it is tracked into.
  frame_stride: int  # Frames of the tour between two frames of a clip.
  short_side: int  # Frames resized to this shorter side...
  size_multiple: int  # ...and the longer side rounded down to a multiple of this.
  dora: objects.DoraOptions  # num_objects (<= the backbone's heads), Sinkhorn, mask threshold.
  seed: int  # The heads picked for discovery.


def load_tour(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A synthetic walking tour: frames (F, H, W, 3) uint8 and masks (F, H, W) uint8 (0 background).

  Args:
    path: the video written by `dora_jax.data.synthetic` (NAME.mp4 beside NAME.masks.npz), or a
      folder holding exactly one such video (e.g. the `demo_data` folder of a training run).
  """
  if os.path.isdir(path):
    videos = sorted(glob.glob(os.path.join(glob.escape(path), "*.mp4")))
    if len(videos) != 1:
      raise TourError(f"{path} holds {len(videos)} .mp4 videos; expected the one synthetic tour "
                      "(or pass the .mp4 itself).")
    path = videos[0]
  if not os.path.isfile(path):
    raise TourError(f"synthetic tour {path} does not exist.")
  masks_path = synthetic.masks_path_for(path)
  if not os.path.isfile(masks_path):
    raise TourError(f"{path} has no ground truth {masks_path}: the tracking evaluation needs a "
                    "tour made by dora_jax.data.synthetic.")
  masks = synthetic.load_masks(path)["masks"]
  try:
    with av.open(path) as container:
      frames = np.stack([frame.to_ndarray(format="rgb24")
                         for frame in container.decode(video=0)])
  except (av.error.FFmpegError, ValueError) as e:
    raise TourError(f"cannot decode {path}: {e}") from None
  if frames.shape[:3] != masks.shape:
    raise TourError(f"{path} has frames {frames.shape[:3]} but masks {masks.shape}.")
  return frames, masks


def resized_shape(height: int, width: int, short_side: int, size_multiple: int
                  ) -> tuple[int, int]:
  """(H', W'): the shorter side `short_side`, the longer rounded down to `size_multiple`."""
  if short_side % size_multiple:
    raise TourError(f"short_side ({short_side}) must be a multiple of size_multiple "
                    f"({size_multiple}).")
  long_side = lambda long, short: max(
      size_multiple, int(short_side * long / short) // size_multiple * size_multiple)
  if height > width:
    return long_side(height, width), short_side
  return short_side, long_side(width, height)


def make_clips(frames: np.ndarray, masks: np.ndarray, settings: TrackSettings
               ) -> tuple[np.ndarray, np.ndarray]:
  """Clips at evenly spaced anchors: frames (C, T, H', W', 3) uint8 and masks (C, T, H', W')."""
  span = (settings.frames_per_clip - 1) * settings.frame_stride
  if frames.shape[0] <= span:
    raise TourError(f"the tour has {frames.shape[0]} frames; a clip of {settings.frames_per_clip} "
                    f"frames {settings.frame_stride} apart spans {span + 1}.")
  anchors = np.unique(np.linspace(0, frames.shape[0] - 1 - span, settings.num_clips).round()
                      .astype(int))
  height, width = resized_shape(frames.shape[1], frames.shape[2], settings.short_side,
                                settings.size_multiple)
  indices = anchors[:, None] + settings.frame_stride * np.arange(settings.frames_per_clip)
  resize = lambda image, method: np.asarray(Image.fromarray(image).resize((width, height), method))
  clip_frames = np.stack([[resize(frames[i], Image.BILINEAR) for i in row] for row in indices])
  clip_masks = np.stack([[resize(masks[i], Image.NEAREST) for i in row] for row in indices])
  return clip_frames, clip_masks


@functools.partial(jax.jit, static_argnames=("clip_shape", "options"))
def _tracked_masks(outputs: dict[str, jax.Array], key: jax.Array, *,
                   clip_shape: tuple[int, int, int, int], options: objects.DoraOptions
                   ) -> jax.Array:
  """Discover, refine, track and binarise (docs/DESIGN.md steps 3-6) -> masks (C, T, k, H, W)."""
  return objects.track_objects(options, outputs, clip_shape, key)["masks"]


def track_objects(encoder: features_lib.Encoder, clip_frames: np.ndarray,
                  settings: TrackSettings, *, batch_size: int = 32) -> np.ndarray:
  """The DoRA kernels on clips: masks (C, T, k, H, W) bool of the k tracked objects."""
  clips, frames_per_clip = clip_frames.shape[:2]
  flat = clip_frames.reshape((-1,) + clip_frames.shape[2:])
  parts = [encoder(flat[i:i + batch_size], pad_to=batch_size)
           for i in range(0, len(flat), batch_size)]
  outputs = {name: np.concatenate([np.asarray(part[name]) for part in parts])
             for name in BACKBONE_OUTPUTS}
  masks = _tracked_masks(outputs, jax.random.PRNGKey(settings.seed),
                         clip_shape=(clips, frames_per_clip) + clip_frames.shape[2:4],
                         options=settings.dora)
  return np.asarray(masks)


def match_and_follow(masks: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """IoU of each tracked object with its best-matching ground-truth object, frame by frame.

  Args:
    masks: (T, k, H, W) bool, the tracked objects of one clip (frame 0 the anchor).
    truth: (T, H, W) integer object ids (0 background).

  Returns:
    iou: (k, T) float64, the IoU of object i in frame t with its match (1 where both are empty);
      empty (0, T) when no object is visible in the anchor.
    matches: (k,) the matched ids: for each tracked object, the object of the anchor frame with
      the largest IoU (the lowest id on a tie).
  """
  ids = [i for i in np.unique(truth[0]) if i != 0]
  if not ids:
    return np.zeros((0, truth.shape[0])), np.zeros((0,), np.int64)
  masks = masks.astype(bool)
  objects = truth[None] == np.asarray(ids)[:, None, None, None]  # (O, T, H, W)
  anchor_iou = _iou(masks[0][:, None], objects[:, 0][None])  # (k, O)
  matches = np.asarray(ids)[np.argmax(anchor_iou, axis=1)]
  matched = truth[None] == matches[:, None, None, None]  # (k, T, H, W)
  return _iou(np.moveaxis(masks, 1, 0), matched), matches


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  intersection = np.sum(a & b, axis=(-2, -1))
  union = np.sum(a | b, axis=(-2, -1))
  return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def tracking_iou(masks: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
  """The report of `match_and_follow` over clips.

  Args:
    masks: (C, T, k, H, W) bool tracked objects; truth: (C, T, H, W) object ids.

  Returns:
    {"track_iou": mean over clips, objects and frames, "track_iou_per_offset": [T means],
     "num_clips": clips with an object in the anchor (the others are skipped)}.
  """
  per_clip = [match_and_follow(m, t)[0] for m, t in zip(masks, truth)]
  rows = [iou for iou in per_clip if iou.size]
  if not rows:
    return {"track_iou": None, "track_iou_per_offset": None, "num_clips": 0}
  iou = np.concatenate(rows)  # (clips * k, T)
  return {"track_iou": float(iou.mean()),
          "track_iou_per_offset": [float(v) for v in iou.mean(axis=0)],
          "num_clips": len(rows)}


def evaluate_tracking(backbone, tour: str | tuple[np.ndarray, np.ndarray],
                      settings: TrackSettings, *,
                      batch_size: int = 32) -> dict[str, Any]:
  """The tracking IoU of a backbone on a synthetic tour (see the module docstring).

  Args:
    backbone: the teacher's backbone (an `Encoder`, or a backbone giving attn, q, k, tokens).
    tour: a path (see `load_tour`) or its (frames, masks).
    settings: `TrackSettings`.
    batch_size: frames per forward pass.

  Returns:
    `tracking_iou`'s report plus "settings".
  """
  frames, masks = load_tour(tour) if isinstance(tour, (str, os.PathLike)) else tour
  clip_frames, clip_masks = make_clips(frames, masks, settings)
  encoder = (backbone if isinstance(backbone, features_lib.Encoder)
             else features_lib.Encoder(backbone, BACKBONE_OUTPUTS))
  tracked = track_objects(encoder, clip_frames, settings, batch_size=batch_size)
  return dict(tracking_iou(tracked, clip_masks), settings=dataclasses.asdict(settings))


ERRORS = (TourError,)


# ---- The evaluator (dora_jax.evaluation.registry): `dora-eval track`, config.evals.NAME. ----


def add_flags(parser: argparse.ArgumentParser, base) -> None:
  """The flags; those a training config also has default to its base values (`base`)."""
  positive = registry.positive_int
  parser.add_argument("--data", required=True,
                      help="The synthetic tour (.mp4 beside its .masks.npz) or its folder.")
  parser.add_argument("--clips", type=positive, default=DEFAULTS["clips"])
  # The synthetic tour's clips, shorter than the config's WT-Venice ones (data.frames_per_clip,
  # data.frame_stride).
  parser.add_argument("--frames-per-clip", type=positive, default=4)
  parser.add_argument("--frame-stride", type=positive, default=10)
  parser.add_argument("--short-side", type=positive, default=base.data.global_size)
  parser.add_argument("--size-multiple", type=int, default=DEFAULTS["size_multiple"],
                      help="Longer side rounded down to this (0: the patch size).")
  parser.add_argument("--num-objects", type=positive, default=base.dora.num_objects)
  parser.add_argument("--sinkhorn-iters", type=positive, default=base.dora.sinkhorn_iters)
  parser.add_argument("--sinkhorn-epsilon", type=float, default=base.dora.sinkhorn_epsilon)
  parser.add_argument("--mask-threshold", default=base.dora.mask_threshold,
                      help="A number, or a rule: 'mean' (of each heat map), 'batch_mean'.")
  parser.add_argument("--seed", type=int, default=base.seed, help="Picks the discovery heads.")
  parser.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"],
                      help="Frames per step.")


class Evaluator:
  """Tracking IoU with `DEFAULTS`' settings; see `registry` for the interface."""

  def __init__(self, values: Mapping[str, Any], *, name_of: Callable[[str], str],
               run: registry.Run | None = None):
    self.values, self.name_of = dict(values), name_of
    data = values["data"]
    if data == DEMO_TOUR:
      if run is None or not run.demo_tour:
        raise registry.SettingError(
            f'{name_of("data")}="{DEMO_TOUR}" needs the synthetic tour of data.synthetic; set '
            "data.synthetic=True or give a tour's path.")
      data = run.demo_tour
    if not data:
      raise registry.SettingError(f"{name_of('data')} is empty: the tracking IoU needs a "
                                  "synthetic tour (.mp4 beside its .masks.npz) or its folder.")
    registry.check_positive(values, ("clips", "batch_size"), name_of)
    try:
      threshold = (objects.parse_threshold(values["mask_threshold"])
                   if values["mask_threshold"] != "" else None)
    except ValueError:
      raise registry.SettingError(
          f"{name_of('mask_threshold')} {values['mask_threshold']!r}: expected a number or one "
          f"of {', '.join(repr(r) for r in tracking.THRESHOLD_RULES)}.") from None
    inherited = run.dora if run is not None else objects.DoraOptions()
    given = dict(num_objects=values["num_objects"], sinkhorn_iters=values["sinkhorn_iters"],
                 sinkhorn_epsilon=values["sinkhorn_epsilon"], mask_threshold=threshold)
    self.dora = dataclasses.replace(inherited, **{k: v for k, v in given.items() if v})
    self.clip_values = {  # The clips' shape, the training run's where 0.
        "frames_per_clip": values["frames_per_clip"] or (run and run.frames_per_clip),
        "frame_stride": values["frame_stride"] or (run and run.frame_stride),
        "short_side": values["short_side"] or (run and run.image_size),
        "seed": run.seed if values["seed"] < 0 and run is not None else values["seed"]}
    registry.check_positive(self.clip_values, ("frames_per_clip", "frame_stride", "short_side"),
                            name_of)
    self.tour = os.path.abspath(data)
    self.frames, self.masks = load_tour(data)
    self.settings, self.clips = None, None  # Made by `check`: they need the patch size.

  def check(self, size) -> None:
    """The objects fit the heads; the clips at the patch size (cut once: `run` reuses them)."""
    if self.dora.num_objects > size.num_heads:
      raise registry.SettingError(
          f"{self.name_of('num_objects')} {self.dora.num_objects} exceeds the backbone's "
          f"{size.num_heads} heads (one head discovers one object).")
    settings = TrackSettings(
        num_clips=self.values["clips"], frames_per_clip=self.clip_values["frames_per_clip"],
        frame_stride=self.clip_values["frame_stride"],
        short_side=self.clip_values["short_side"],
        size_multiple=self.values["size_multiple"] or size.patch_size, dora=self.dora,
        seed=self.clip_values["seed"])
    if settings != self.settings:
      self.clips = make_clips(self.frames, self.masks, settings)
      self.settings = settings

  def run(self, backbone, *, out_dir: str | None = None, progress: bool = False) -> dict:
    del out_dir, progress  # The report is all; a few clips.
    self.check(backbone.size)
    encoder = features_lib.Encoder(backbone, BACKBONE_OUTPUTS)
    tracked = track_objects(encoder, self.clips[0], self.settings,
                            batch_size=self.values["batch_size"])
    report = tracking_iou(tracked, self.clips[1])
    offsets = report["track_iou_per_offset"]
    return dict(report, track_iou_last=offsets[-1] if offsets else None,
                settings=dataclasses.asdict(self.settings), tour=self.tour)

  def summary(self, report: dict) -> str:
    offsets = " ".join(_fmt(v) for v in report["track_iou_per_offset"] or [])
    return (f"tracking IoU {_fmt(report['track_iou'])} over {report['num_clips']} clips (per "
            f"frame offset: {offsets})")


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"
