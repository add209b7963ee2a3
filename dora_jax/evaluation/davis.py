"""DAVIS-2017 semi-supervised video object segmentation by label propagation, and its J&F.

Label propagation as DINO's eval_video_segmentation.py does it (its defaults): every frame is
resized to a shorter side of 480 px (the longer side rounded down to a multiple of 64), the
backbone's last-layer patch tokens are L2-normalised, and the labels of frame t are propagated
from the first frame (its ground truth) and the n_last_frames=7 previous frames (their propagated
soft labels): affinities exp(cosine / 0.1) to every source patch within a square window of
size_mask_neighborhood=12 patches, only the topk=5 largest per target patch kept and normalised
to sum one, the soft one-hot labels averaged with them at patch resolution
(`propagation.propagate`, which computes only the affinities inside the window). The soft labels
are upsampled bilinearly by the patch size, each channel rescaled to [0, 1], arg-maxed, and
resized to the original frame (nearest). Two small departures from the reference code: frames are resized
with PIL's bilinear filter (DINO: OpenCV's), and normalised with the ImageNet std 0.229 (DINO's
script has 0.228 for red).

Metrics as the DAVIS-2017 semi-supervised evaluation (davis2017-evaluation) defines them, per
object (ids 1..max id of the first annotation) and frame, the first and last frames excluded:
J the region IoU (1 when both masks are empty), F the boundary F-measure (boundaries of
`boundary_map`, matched within a disk of ceil(0.008 x image diagonal) pixels). J and F are the
means over the frames per object, then over all objects of all sequences; J&F their mean.

Layout read: ROOT/JPEGImages/480p/SEQ/*.jpg, ROOT/Annotations/480p/SEQ/*.png (palette PNGs),
ROOT/ImageSets/2017/val.txt. Written: OUT/SEQ/NNNNN.png for every frame (palette of the first
annotation; frame 0 is its ground truth) and OUT/pictures/SEQ.png; `dora-eval davis` writes the
report beside them (OUT/davis_metrics.json). During pretraining nothing is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
import tqdm

from dora_jax.evaluation import features as features_lib
from dora_jax.evaluation import propagation
from dora_jax.evaluation import registry

METRICS_FILE = "davis_metrics.json"
PICTURES_DIR = "pictures"
BOUNDARY_THRESHOLD = 0.008  # Of the image diagonal: the davis2017-evaluation bound_th.


class DavisError(ValueError):
  """A DAVIS folder (or sequence) that cannot be evaluated; the message is one line."""


@dataclasses.dataclass(frozen=True)
class PropagationSettings:
  """DINO's eval_video_segmentation.py defaults."""
  n_last_frames: int = 7  # Previous frames (with their propagated labels) used as sources.
  size_mask_neighborhood: int = 12  # Sources within this many patches (square window); 0: all.
  topk: int = 5  # Source patches kept per target patch.
  temperature: float = 0.1  # Affinity exp(cosine / temperature).
  short_side: int = 480  # Frames resized to this shorter side...
  size_multiple: int = 64  # ...and the longer side rounded down to a multiple of this.


# ---- The DAVIS layout. ----


@dataclasses.dataclass(frozen=True)
class DavisSequence:
  name: str
  frames: tuple[str, ...]  # JPEG paths, sorted.
  annotations: tuple[str | None, ...]  # The PNG of each frame, None where there is none.


def list_sequences(root: str, sequences: Sequence[str] | None = None, *, split: str = "val",
                   resolution: str = "480p") -> list[DavisSequence]:
  """The sequences of a DAVIS folder: `sequences`, or those of ImageSets/2017/{split}.txt."""
  if not os.path.isdir(root):
    raise DavisError(f"DAVIS folder {root} does not exist.")
  image_dir = os.path.join(root, "JPEGImages", resolution)
  annotation_dir = os.path.join(root, "Annotations", resolution)
  for folder in (image_dir, annotation_dir):
    if not os.path.isdir(folder):
      raise DavisError(f"{folder} does not exist: expected the DAVIS-2017 layout "
                       f"(JPEGImages/{resolution}/SEQ/*.jpg, Annotations/{resolution}/SEQ/*.png).")
  if not sequences:
    list_file = os.path.join(root, "ImageSets", "2017", f"{split}.txt")
    if not os.path.isfile(list_file):
      raise DavisError(f"{list_file} does not exist: give the sequences with --sequences, or use "
                       "the DAVIS-2017 folder with its ImageSets.")
    with open(list_file) as f:
      sequences = [line.strip() for line in f if line.strip()]
    if not sequences:
      raise DavisError(f"{list_file} lists no sequences.")
  found = []
  for name in sequences:
    frames = sorted(glob.glob(os.path.join(glob.escape(image_dir), name, "*.jpg")))
    if not frames:
      raise DavisError(f"sequence {name!r} has no frames in {os.path.join(image_dir, name)}.")
    annotations = []
    for frame in frames:
      png = os.path.join(annotation_dir, name, os.path.splitext(os.path.basename(frame))[0]
                         + ".png")
      annotations.append(png if os.path.isfile(png) else None)
    if annotations[0] is None:
      raise DavisError(f"sequence {name!r} has no first-frame annotation "
                       f"{os.path.join(annotation_dir, name)}/"
                       f"{os.path.splitext(os.path.basename(frames[0]))[0]}.png.")
    found.append(DavisSequence(name, tuple(frames), tuple(annotations)))
  return found


def default_palette() -> np.ndarray:
  """The PASCAL VOC / DAVIS colour palette (256, 3) uint8: label i gets the bits of i spread."""
  palette = np.zeros((256, 3), np.uint8)
  for label in range(256):
    value, colour = label, [0, 0, 0]
    for shift in range(7, -1, -1):
      for channel in range(3):
        colour[channel] |= ((value >> channel) & 1) << shift
      value >>= 3
    palette[label] = colour
  return palette


def read_annotation(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A DAVIS annotation: labels (H, W) uint8 (void 255 -> 0, as the evaluation does) and its
  palette (256, 3) uint8 (the VOC palette for greyscale label images)."""
  try:
    with Image.open(path) as image:
      if image.mode == "P":
        palette = np.zeros((256, 3), np.uint8)
        raw = np.asarray(image.getpalette() or [], np.uint8).reshape(-1, 3)[:256]
        palette[:len(raw)] = raw
      elif image.mode == "L":
        palette = default_palette()
      else:
        raise DavisError(f"annotation {path} is a {image.mode} image; expected a palette (P) or "
                         "greyscale (L) PNG of object ids.")
      labels = np.array(image)
  except OSError as e:
    raise DavisError(f"cannot read annotation {path}: {e}") from None
  labels[labels == 255] = 0
  return labels, palette


def write_indexed_png(path: str, labels: np.ndarray, palette: np.ndarray) -> None:
  image = Image.fromarray(labels.astype(np.uint8), mode="P")
  image.putpalette(palette.astype(np.uint8).ravel().tolist())
  image.save(path, format="PNG")


def _read_rgb(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except OSError as e:
    raise DavisError(f"cannot read frame {path}: {e}") from None


# ---- Label propagation. ----


def frame_size(height: int, width: int, short_side: int = 480,
               size_multiple: int = 64) -> tuple[int, int]:
  """DINO's resize: the shorter side to `short_side`, the longer rounded down to the multiple."""
  long_side = lambda long, short: max(
      size_multiple, int((short_side * long / short) // size_multiple * size_multiple))
  if height > width:
    return long_side(height, width), short_side
  return short_side, long_side(width, height)


def segment_sequence(encoder: features_lib.Encoder, frames: Sequence[np.ndarray],
                     first_labels: np.ndarray, settings: PropagationSettings = PropagationSettings(),
                     *, batch_size: int = 8) -> np.ndarray:
  """Propagates the first frame's labels through a video.

  Args:
    encoder: an `Encoder` with the "tokens" output (patch tokens (B, N, D)).
    frames: T uint8 (H, W, 3) frames of one size.
    first_labels: (H, W) integer object ids of frame 0 (0 background).
    settings: `PropagationSettings`.
    batch_size: frames per forward pass.

  Returns:
    (T, H, W) uint8 labels; frame 0 is `first_labels`.
  """
  if len(frames) == 1:
    return first_labels[None].astype(np.uint8)
  height, width = frames[0].shape[:2]
  size = frame_size(height, width, settings.short_side, settings.size_multiple)
  resized = np.stack([np.asarray(Image.fromarray(frame).resize(size[::-1], Image.BILINEAR))
                      for frame in frames])
  tokens = [np.asarray(encoder(resized[i:i + batch_size], pad_to=batch_size)["tokens"])
            for i in range(0, len(resized), batch_size)]
  tokens = np.concatenate(tokens)  # (T, N, D)
  patch_size = int(round(math.sqrt(size[0] * size[1] / tokens.shape[1])))
  grid = (size[0] // patch_size, size[1] // patch_size)
  if grid[0] * grid[1] != tokens.shape[1]:
    raise DavisError(f"the backbone gave {tokens.shape[1]} patches for {size[0]}x{size[1]} "
                     "frames; expected a square patch grid.")
  num_classes = int(first_labels.max()) + 1
  small = np.asarray(Image.fromarray(first_labels.astype(np.uint8)).resize(grid[::-1],
                                                                           Image.NEAREST))
  one_hot = np.eye(num_classes, dtype=np.float32)[small.reshape(-1)]
  soft = propagation.propagate(tokens, one_hot, grid=grid,
                               radius=settings.size_mask_neighborhood,
                               n_last_frames=settings.n_last_frames, topk=settings.topk,
                               temperature=settings.temperature)
  labels = np.asarray(propagation.soft_labels_to_pixels(soft, grid=grid, patch_size=patch_size))
  out = [first_labels.astype(np.uint8)]
  out += [np.asarray(Image.fromarray(frame_labels).resize((width, height), Image.NEAREST))
          for frame_labels in labels]
  return np.stack(out)


# ---- DAVIS-2017 metrics. ----


def region_similarity(annotation: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
  """J: IoU of boolean masks (..., H, W) -> (...), 1 where both are empty."""
  annotation, segmentation = annotation.astype(bool), segmentation.astype(bool)
  intersection = np.sum(annotation & segmentation, axis=(-2, -1))
  union = np.sum(annotation | segmentation, axis=(-2, -1))
  return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def boundary_map(mask: np.ndarray) -> np.ndarray:
  """One-pixel-wide boundaries of a boolean mask (H, W), as the DAVIS seg2bmap draws them.

  A pixel is a boundary pixel when it differs from its right, lower or lower-right neighbour
  (outside the image counts as background, except that the last row compares only to the right
  and the last column only downwards): the boundary sits half a pixel towards the origin.
  """
  mask = mask.astype(bool)
  right = np.zeros_like(mask)
  down = np.zeros_like(mask)
  diagonal = np.zeros_like(mask)
  right[:, :-1] = mask[:, 1:]
  down[:-1, :] = mask[1:, :]
  diagonal[:-1, :-1] = mask[1:, 1:]
  boundary = (mask ^ right) | (mask ^ down) | (mask ^ diagonal)
  boundary[-1, :] = mask[-1, :] ^ right[-1, :]
  boundary[:, -1] = mask[:, -1] ^ down[:, -1]
  boundary[-1, -1] = False
  return boundary


def _disk(radius: int) -> np.ndarray:
  offsets = np.arange(-radius, radius + 1)
  return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def boundary_f_measure(annotation: np.ndarray, segmentation: np.ndarray,
                       bound_th: float = BOUNDARY_THRESHOLD) -> float:
  """F: the boundary F-measure of two boolean masks (H, W).

  A boundary pixel of one mask counts as matched when the other's boundary passes within a disk
  of radius ceil(bound_th x diagonal) pixels (bound_th >= 1: that many pixels). An empty
  boundary on both sides scores 1; on one side only, 0.
  """
  radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*annotation.shape)))
  predicted, truth = boundary_map(segmentation), boundary_map(annotation)
  disk = _disk(radius)
  predicted_near = ndimage.binary_dilation(predicted, structure=disk)
  truth_near = ndimage.binary_dilation(truth, structure=disk)
  num_predicted, num_truth = int(predicted.sum()), int(truth.sum())
  if num_predicted == 0 and num_truth == 0:
    return 1.0
  if num_predicted == 0 or num_truth == 0:
    return 0.0
  precision = np.sum(predicted & truth_near) / num_predicted
  recall = np.sum(truth & predicted_near) / num_truth
  if precision + recall == 0:
    return 0.0
  return float(2 * precision * recall / (precision + recall))


def sequence_scores(truth: np.ndarray, prediction: np.ndarray) -> dict[int, dict[str, float]]:
  """Per object id of the first frame: mean J and F over frames 1..T-2.

  Args:
    truth, prediction: (T, H, W) integer label maps (T >= 3).

  Returns:
    {object id: {"J": mean J, "F": mean F}} for ids 1..max(truth[0]).
  """
  if truth.shape != prediction.shape:
    raise DavisError(f"the prediction has shape {prediction.shape}, the ground truth "
                     f"{truth.shape}.")
  scores = {}
  for obj in range(1, int(truth[0].max()) + 1):
    inner_truth, inner_prediction = truth[1:-1] == obj, prediction[1:-1] == obj
    j = region_similarity(inner_truth, inner_prediction)
    f = [boundary_f_measure(t, p) for t, p in zip(inner_truth, inner_prediction)]
    scores[obj] = {"J": float(np.mean(j)), "F": float(np.mean(f))}
  return scores


# ---- Pictures. ----


def overlay_picture(frames: Sequence[np.ndarray], labels: np.ndarray, palette: np.ndarray, *,
                    num_columns: int = 6, height: int = 160) -> np.ndarray:
  """Evenly spaced frames with their labels blended in palette colours, side by side (uint8)."""
  picks = np.unique(np.linspace(0, len(frames) - 1, min(num_columns, len(frames))).round()
                    .astype(int))
  tiles = []
  for index in picks:
    frame = frames[index].astype(np.float32)
    colour = palette[labels[index]].astype(np.float32)
    blended = np.where(labels[index][..., None] > 0, 0.5 * frame + 0.5 * colour, frame)
    tile = Image.fromarray(blended.round().astype(np.uint8))
    width = max(1, round(tile.width * height / tile.height))
    tiles.append(np.asarray(tile.resize((width, height), Image.BILINEAR)))
  gap = np.full((height, 2, 3), 255, np.uint8)
  return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)


# ---- The whole evaluation. ----


def _mean(values: list[float]) -> float | None:
  return float(np.mean(values)) if values else None


def evaluate_davis(backbone, root: str, out_dir: str | None, *,
                   sequences: Sequence[str] | None = None,
                   split: str = "val", settings: PropagationSettings = PropagationSettings(),
                   batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
  """Segments the DAVIS sequences by label propagation, writes the masks and the J&F metrics.

  Args:
    backbone: the encoder (see `features.Encoder`; its "tokens" output is used).
    root: the DAVIS-2017 folder.
    out_dir: where OUT/SEQ/*.png and OUT/pictures/SEQ.png go (None: nothing is written). A
      sequence's masks are written to a temporary folder and renamed when complete.
    sequences: sequence names (default: those of ImageSets/2017/{split}.txt).
    settings: `PropagationSettings` (DINO's defaults).
    batch_size: frames per forward pass.
    progress: a tqdm bar over the sequences.

  Returns:
    The report (dora-eval's davis_metrics.json): "J&F", "J", "F" (means over all objects, 0-1; None
    when no sequence has ground truth beyond its first frame), "sequences": {name: {"J&F", "J",
    "F", "objects": {id: {"J", "F"}}}}, "settings".
  """
  found = list_sequences(root, sequences, split=split)
  encoder = (backbone if isinstance(backbone, features_lib.Encoder)
             else features_lib.Encoder(backbone, ("tokens",)))
  if out_dir is not None:
    os.makedirs(os.path.join(out_dir, PICTURES_DIR), exist_ok=True)
  per_sequence, all_j, all_f = {}, [], []
  for sequence in tqdm.tqdm(found, unit="seq", disable=not progress, dynamic_ncols=True):
    frames = [_read_rgb(path) for path in sequence.frames]
    if len({frame.shape for frame in frames}) != 1:
      raise DavisError(f"sequence {sequence.name!r} has frames of different sizes.")
    first_labels, palette = read_annotation(sequence.annotations[0])
    if first_labels.shape != frames[0].shape[:2]:
      raise DavisError(f"{sequence.annotations[0]} is {first_labels.shape}, its frame "
                       f"{frames[0].shape[:2]}.")
    labels = segment_sequence(encoder, frames, first_labels, settings, batch_size=batch_size)
    if out_dir is not None:
      _write_sequence(out_dir, sequence, frames, labels, palette)

    if len(frames) < 3 or any(path is None for path in sequence.annotations):
      per_sequence[sequence.name] = {"J&F": None, "J": None, "F": None, "objects": {},
                                     "note": "no ground truth for every frame (or < 3 frames)"}
      continue
    truth = np.stack([read_annotation(path)[0] for path in sequence.annotations])
    scores = sequence_scores(truth, labels)
    js = [s["J"] for s in scores.values()]
    fs = [s["F"] for s in scores.values()]
    all_j += js
    all_f += fs
    mean_j, mean_f = _mean(js), _mean(fs)
    per_sequence[sequence.name] = {
        "J": mean_j, "F": mean_f,
        "J&F": None if mean_j is None else (mean_j + mean_f) / 2,
        "objects": {str(obj): s for obj, s in scores.items()}}

  mean_j, mean_f = _mean(all_j), _mean(all_f)
  report = {
      "J&F": None if mean_j is None else (mean_j + mean_f) / 2,
      "J": mean_j,
      "F": mean_f,
      "num_objects": len(all_j),
      "sequences": per_sequence,
      "settings": dataclasses.asdict(settings),
  }
  return report


def _write_sequence(out_dir: str, sequence: DavisSequence, frames: Sequence[np.ndarray],
                    labels: np.ndarray, palette: np.ndarray) -> None:
  """OUT/SEQ/*.png (renamed into place when complete) and OUT/pictures/SEQ.png."""
  final = os.path.join(out_dir, sequence.name)
  tmp = final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for path, frame_labels in zip(sequence.frames, labels):
    name = os.path.splitext(os.path.basename(path))[0] + ".png"
    write_indexed_png(os.path.join(tmp, name), frame_labels, palette)
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)
  picture = overlay_picture(frames, labels, palette)
  picture_path = os.path.join(out_dir, PICTURES_DIR, f"{sequence.name}.png")
  Image.fromarray(picture).save(picture_path + ".tmp.png")
  os.replace(picture_path + ".tmp.png", picture_path)


# ---- The evaluator (dora_jax.evaluation.registry): `dora-eval davis`, config.evals.NAME. ----

# Its settings (config.evals.NAME keys, dora-eval davis's flags): DINO's values.
DEFAULTS = {
    "data": "",  # The DAVIS-2017 folder.
    "sequences": (),  # Sequences to run (empty: those of ImageSets/2017/SPLIT.txt).
    "split": "val",  # ImageSets/2017/SPLIT.txt lists the sequences.
    "n_last_frames": PropagationSettings.n_last_frames,  # Previous frames used as sources.
    "size_mask_neighborhood": PropagationSettings.size_mask_neighborhood,  # Window (0: all).
    "topk": PropagationSettings.topk,  # Source patches kept per target patch.
    "temperature": PropagationSettings.temperature,  # Affinity exp(cosine / temperature).
    "short_side": PropagationSettings.short_side,  # Frames resized to this shorter side...
    "size_multiple": PropagationSettings.size_multiple,  # ...longer side to a multiple of this.
    "batch_size": 8,  # Frames per forward pass.
}
REPORT_FILE = METRICS_FILE
SCORES = ("J&F", "J", "F")
ERRORS = (DavisError,)
DESCRIPTION = "DAVIS-2017 video object segmentation by label propagation (J&F)."


def add_flags(parser: argparse.ArgumentParser, base) -> None:
  del base  # DINO's values, not the training config's.
  positive = registry.positive_int
  parser.add_argument("--data", required=True, help="The DAVIS-2017 folder.")
  parser.add_argument("--sequences", nargs="+", default=DEFAULTS["sequences"],
                      help="Sequences to run (default: ImageSets/2017/SPLIT.txt).")
  parser.add_argument("--split", default=DEFAULTS["split"],
                      help="ImageSets/2017/SPLIT.txt lists sequences.")
  parser.add_argument("--n-last-frames", type=positive, default=DEFAULTS["n_last_frames"])
  parser.add_argument("--size-mask-neighborhood", type=int,
                      default=DEFAULTS["size_mask_neighborhood"],
                      help="Source patches within this many patches (0: all).")
  parser.add_argument("--topk", type=positive, default=DEFAULTS["topk"])
  parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
  parser.add_argument("--short-side", type=positive, default=DEFAULTS["short_side"],
                      help="Frames resized to this shorter side.")
  parser.add_argument("--size-multiple", type=positive, default=DEFAULTS["size_multiple"],
                      help="The longer side rounded down to a multiple of this.")
  parser.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"],
                      help="Frames per step.")


class Evaluator:
  """J&F with `DEFAULTS`' settings; see `registry` for the interface."""

  def __init__(self, values: Mapping[str, Any], *, name_of: Callable[[str], str],
               run: registry.Run | None = None):
    del run  # The frames are read at each run: DAVIS sets stay on disk.
    self.values, self.name_of = dict(values), name_of
    if not values["data"]:
      raise registry.SettingError(f"{name_of('data')} is empty: give the DAVIS-2017 folder.")
    registry.check_positive(values, ("n_last_frames", "topk", "short_side", "size_multiple",
                                     "batch_size"), name_of)
    self.sequences = list(values["sequences"]) or None
    list_sequences(values["data"], self.sequences, split=values["split"])  # Checks the folder.
    self.settings = PropagationSettings(
        **{field.name: values[field.name] for field in dataclasses.fields(PropagationSettings)})

  def check(self, size) -> None:
    patch_size = size.patch_size
    if self.settings.short_side % patch_size or self.settings.size_multiple % patch_size:
      raise registry.SettingError(
          f"{self.name_of('short_side')} {self.settings.short_side} and "
          f"{self.name_of('size_multiple')} {self.settings.size_multiple} must be multiples of "
          f"the backbone's patch size {patch_size}.")

  def run(self, backbone, *, out_dir: str | None = None, progress: bool = False) -> dict:
    self.check(backbone.size)
    return evaluate_davis(backbone, self.values["data"], out_dir, sequences=self.sequences,
                          split=self.values["split"], settings=self.settings,
                          batch_size=self.values["batch_size"], progress=progress)

  def summary(self, report: dict) -> str:
    fmt = lambda value: "n/a" if value is None else f"{value:.3f}"
    return (f"DAVIS-2017 ({len(report['sequences'])} sequences, {report['num_objects']} "
            f"objects): J&F {fmt(report['J&F'])}, J {fmt(report['J'])}, F {fmt(report['F'])}")
