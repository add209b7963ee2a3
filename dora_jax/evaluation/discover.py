"""Object discovery with LOST (Siméoni et al., BMVC 2021) and its CorLoc on PASCAL VOC.

LOST is training-free and works on one image at a time, from the keys of the backbone's last
block. The published defaults, and the choices made where the paper or its code leave room:

1. Features F (N, h * d_head): the last block's keys of the N patch tokens ([CLS] dropped), heads
   concatenated, not normalised (LOST's `--which_features k`; the keys include the qkv bias).
2. Similarity A = F F^T (N, N), in float32 at HIGHEST matmul precision, so that TF32 on a GPU
   does not flip the sign of small correlations.
3. Degree of patch i: the number of j != i with A_ij > 0 (the positive-correlation graph; LOST
   zeroes the diagonal first, so a patch is not its own neighbour).
4. Patches ordered by ascending degree, ties by patch index (a stable sort; LOST's torch.argsort
   leaves the order of ties unspecified). The seed is the first; the k = 100 first (all N when
   fewer) are the candidates.
5. Expansion: the candidates positively correlated with the seed, A[seed, c] > 0. The seed is
   one of them (A[seed, seed] = |f_seed|^2 > 0).
6. Box: the patches j whose summed similarity to the expanded set is positive, sum_s A[s, j] > 0;
   of these, the connected component (4-connectivity on the patch grid, scipy.ndimage.label's
   default) holding the seed; its bounding box in patches, ends exclusive. The seed always
   belongs to it (its sum is a sum of positive terms); only a zero key at the seed (an empty
   expanded set) falls back to the seed's own patch.
7. Pixels: patches times the patch size, clipped to the image before padding, then scaled per
   axis from the resized image to the original one: a continuous box [x0, y0, x1, y1) (0-based,
   ends exclusive), reported in VOC's 1-based inclusive convention (`voc.continuous_to_voc`).

Images are read at their own resolution (LOST does not resize) or, with `short_side`, resized to
that shorter side (bicubic, aspect ratio kept, `data.images.shorter_side_size`); then padded at the
bottom and right to multiples of the patch size, as LOST does. LOST pads the normalised image with
zeros; the uint8 images here are padded with the ImageNet mean colour rounded to integers, which
normalises to within 0.01 of zero. Images of one padded size are batched together (one compiled
program per size).

CorLoc: the percentage of images whose predicted box has IoU >= 0.5 with any of its ground-truth
boxes (all of them, difficult and truncated included, as LOST). IoU in the continuous convention
(`box_iou`); for integer VOC boxes it is the IoU of the pixel sets. An image without any
ground-truth box counts as a miss.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw
from scipy import ndimage
import tqdm

from dora_jax.data import images as images_lib
from dora_jax.evaluation import features as features_lib
from dora_jax.evaluation import registry
from dora_jax.evaluation import voc
from dora_jax.models import vit

PICTURES_DIR = "pictures"
NUM_PICTURES = 8  # The first images of the split get a picture with both boxes.
IOU_THRESHOLD = 0.5  # CorLoc's "localised".
TRUTH_COLOUR = (0, 220, 0)
PREDICTION_COLOUR = (255, 40, 40)
# The padding colour: the ImageNet mean, which normalises to (about) LOST's zero padding.
PAD_COLOUR = tuple(round(255 * channel) for channel in vit.PIXEL_MEAN)


# ---- LOST. ----


def key_features(keys: jax.Array) -> jax.Array:
  """The backbone's last-block keys (B, h, N+1, d_head) -> patch features (B, N, h * d_head)."""
  batch, heads, tokens, head_dim = keys.shape
  return jnp.moveaxis(keys[:, :, 1:], 1, 2).reshape(batch, tokens - 1, heads * head_dim)


@functools.partial(jax.jit, static_argnames=("k_patches",))
def expansion_scores(features: jax.Array, *, k_patches: int = 100
                     ) -> tuple[jax.Array, jax.Array]:
  """LOST's seed and seed expansion (steps 2-6 of the module docstring, before the component).

  Args:
    features: (B, N, D) patch features.
    k_patches: the lowest-degree patches the expansion may reach.

  Returns:
    scores (B, N) float32, each patch's summed similarity to the expanded set, and seed (B,)
    int32, the patch of lowest degree.
  """
  num_patches = features.shape[1]
  similarity = jnp.einsum("bnd,bmd->bnm", features, features,
                          precision=jax.lax.Precision.HIGHEST)
  neighbours = (similarity > 0) & ~jnp.eye(num_patches, dtype=bool)
  degree = jnp.sum(neighbours, axis=-1)  # (B, N)
  order = jnp.argsort(degree, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)  # rank[i]: position of patch i in the order.
  seed = order[:, 0]
  to_seed = jnp.take_along_axis(similarity, seed[:, None, None], axis=1)[:, 0]  # (B, N)
  expanded = (rank < min(k_patches, num_patches)) & (to_seed > 0)
  scores = jnp.einsum("bn,bnm->bm", expanded.astype(similarity.dtype), similarity,
                      precision=jax.lax.Precision.HIGHEST)
  return scores, seed.astype(jnp.int32)


def seed_box(scores: np.ndarray, seed: int, grid: tuple[int, int]) -> np.ndarray:
  """The box of the seed's connected component of {scores > 0} (step 6).

  Args:
    scores: (N,) `expansion_scores` of one image, N = gh * gw patches in row-major order.
    seed: the seed's patch index.
    grid: (gh, gw), the patch grid.

  Returns:
    (4,) int64 [x0, y0, x1, y1) in patches (ends exclusive).
  """
  row, col = divmod(int(seed), grid[1])
  components, _ = ndimage.label(np.asarray(scores).reshape(grid) > 0)  # 4-connectivity.
  if components[row, col] == 0:  # A zero key at the seed: nothing was expanded.
    return np.array([col, row, col + 1, row + 1], np.int64)
  rows, cols = np.nonzero(components == components[row, col])
  return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.int64)


def lost(keys: jax.Array, grid: tuple[int, int], *, k_patches: int = 100) -> np.ndarray:
  """LOST's box for each image of a batch.

  Args:
    keys: (B, h, N+1, d_head) the last block's keys ([CLS] first), N = gh * gw.
    grid: (gh, gw), the patch grid of the images.
    k_patches: the lowest-degree patches the expansion may reach (LOST: 100).

  Returns:
    (B, 4) int64 boxes [x0, y0, x1, y1) in patches (ends exclusive).
  """
  if keys.shape[2] - 1 != grid[0] * grid[1]:
    raise ValueError(f"keys hold {keys.shape[2] - 1} patches; the grid {grid} has "
                     f"{grid[0] * grid[1]}.")
  scores, seeds = expansion_scores(key_features(keys), k_patches=k_patches)
  scores, seeds = np.asarray(scores), np.asarray(seeds)
  return np.stack([seed_box(s, seed, grid) for s, seed in zip(scores, seeds)])


def box_to_pixels(patch_box: np.ndarray, patch_size: int, resized: tuple[int, int],
                  original: tuple[int, int]) -> np.ndarray:
  """A box in patches -> a continuous box (4,) float64 in the original image's pixels.

  Args:
    patch_box: (4,) [x0, y0, x1, y1) in patches of the (padded) resized image.
    patch_size: the backbone's patch side.
    resized: (height, width) of the resized image before padding.
    original: (height, width) of the original image.
  """
  limits = np.array([resized[1], resized[0]] * 2, np.float64)
  box = np.minimum(np.asarray(patch_box, np.float64) * patch_size, limits)
  return box * np.array([original[1], original[0]] * 2, np.float64) / limits


# ---- CorLoc. ----


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one continuous box (4,) with each of boxes (M, 4) -> (M,) (areas (x1-x0)(y1-y0))."""
  box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
  width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
  height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
  intersection = width * height
  area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0,
                                                                      None)
  union = area(box) + area(boxes) - intersection
  return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def corloc(predictions: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray], *,
           threshold: float = IOU_THRESHOLD) -> float:
  """CorLoc in percent: images whose box has IoU >= threshold with any ground-truth box.

  Args:
    predictions: one continuous box (4,) per image.
    ground_truths: per image, its ground-truth boxes (M_i, 4), continuous (`voc_to_continuous`).
  """
  if len(predictions) != len(ground_truths) or not predictions:
    raise ValueError(f"corloc needs one prediction per image and at least one image; got "
                     f"{len(predictions)} predictions and {len(ground_truths)} images.")
  hits = [localised(box, truth, threshold) for box, truth in zip(predictions, ground_truths)]
  return 100.0 * sum(hits) / len(hits)


def localised(prediction: np.ndarray, truth: np.ndarray,
              threshold: float = IOU_THRESHOLD) -> bool:
  """Whether a continuous box (4,) has IoU >= threshold with any box of truth (M, 4)."""
  return bool(np.any(box_iou(prediction, truth) >= threshold))


# ---- The evaluation on a VOC folder. ----


def input_sizes(height: int, width: int, *, short_side: int, patch_size: int
                ) -> tuple[tuple[int, int], tuple[int, int]]:
  """(resized (h, w), padded (h, w)): the image after the optional resize, and after padding to
  multiples of the patch size."""
  resized = (images_lib.shorter_side_size(height, width, short_side) if short_side
             else (height, width))
  padded = tuple(patch_size * math.ceil(side / patch_size) for side in resized)
  return resized, padded


def _prepare(image: voc.VocImage, resized: tuple[int, int], padded: tuple[int, int]
             ) -> np.ndarray:
  """The image decoded, resized and padded: uint8 (padded_h, padded_w, 3)."""
  try:
    with Image.open(image.image_path) as file:
      pixels = np.asarray(file.convert("RGB"))
  except OSError as e:
    raise voc.VocError(f"cannot read image {image.image_path}: {e}") from None
  if pixels.shape[:2] != (image.height, image.width):
    raise voc.VocError(f"image {image.image_path} is {pixels.shape[1]}x{pixels.shape[0]} but its "
                       f"annotation says {image.width}x{image.height}.")
  if resized != pixels.shape[:2]:
    pixels = images_lib.resize_shorter_side(pixels, min(resized))
  out = np.empty(padded + (3,), np.uint8)
  out[:] = PAD_COLOUR
  out[:resized[0], :resized[1]] = pixels
  return out


def _batches(images: Sequence[voc.VocImage], sizes: Sequence[tuple], batch_size: int
             ) -> list[list[int]]:
  """Image indices in batches of one padded size (at most batch_size each)."""
  groups: dict[tuple[int, int], list[int]] = {}
  for index, (_, padded) in enumerate(sizes):
    groups.setdefault(padded, []).append(index)
  return [group[start:start + batch_size] for group in groups.values()
          for start in range(0, len(group), batch_size)]


def _decoded(images, sizes, batches, num_threads: int) -> Iterator[tuple[list[int], np.ndarray]]:
  """(indices, uint8 batch) in order; the next batch decodes meanwhile."""
  with concurrent.futures.ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as pool:
    submit = lambda batch: [pool.submit(_prepare, images[i], *sizes[i]) for i in batch]
    pending = submit(batches[0]) if batches else []
    for number, batch in enumerate(batches):
      done = [future.result() for future in pending]
      pending = submit(batches[number + 1]) if number + 1 < len(batches) else []
      yield batch, np.stack(done)


def draw_boxes(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) with the ground-truth boxes (M, 4) in green and the prediction (4,) in red,
  all in VOC's 1-based inclusive convention."""
  picture = Image.fromarray(image)
  draw = ImageDraw.Draw(picture)
  width = max(1, round(min(image.shape[:2]) / 150))
  for box, colour in [(b, TRUTH_COLOUR) for b in truth] + [(prediction, PREDICTION_COLOUR)]:
    x0, y0, x1, y1 = (float(v) - 1 for v in box)  # PIL draws 0-based, both ends inclusive.
    draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=width)
  return np.asarray(picture)


def evaluate_discovery(backbone: vit.VisionTransformer, root: str, out_dir: str | None, *,
                       split: str = "trainval", short_side: int = 0, k_patches: int = 100,
                       batch_size: int = 8, num_threads: int = 0,
                       progress: bool = True) -> dict[str, Any]:
  """LOST on every image of a VOC split, its CorLoc, and pictures of the first images.

  Args:
    backbone: the ViT (its "k" output and patch size are used).
    root: the VOC folder (`voc.list_images`).
    out_dir: where OUT/pictures/ID.png go (ground truth green, prediction red); None: nowhere.
    split: ImageSets/Main/{split}.txt lists the images.
    short_side: resize the shorter side to this many pixels first (0: the original size, LOST).
    k_patches: LOST's k.
    batch_size: images per forward pass (images of one padded size share a batch).
    num_threads: decoding threads (0: min(8, CPUs)).
    progress: a tqdm bar over the images.

  Returns:
    "CorLoc" (percent), "num_images", "num_localised", "boxes": {image id: [xmin, ymin, xmax,
    ymax]} in VOC's 1-based inclusive convention (the ground truth's), "split", "settings".
  """
  images = voc.list_images(root, split)
  patch_size = backbone.size.patch_size
  encoder = features_lib.Encoder(backbone, ("k",))
  sizes = [input_sizes(image.height, image.width, short_side=short_side, patch_size=patch_size)
           for image in images]
  batches = _batches(images, sizes, batch_size)
  padded_batch = encoder.padded_size(batch_size)
  predictions: list[np.ndarray | None] = [None] * len(images)
  with tqdm.tqdm(total=len(images), unit="img", disable=not progress, dynamic_ncols=True) as bar:
    for batch, pixels in _decoded(images, sizes, batches, num_threads):
      padded = sizes[batch[0]][1]
      grid = (padded[0] // patch_size, padded[1] // patch_size)
      keys = encoder(pixels, pad_to=padded_batch)["k"]
      for index, patch_box in zip(batch, lost(keys, grid, k_patches=k_patches)):
        image = images[index]
        predictions[index] = box_to_pixels(patch_box, patch_size, sizes[index][0],
                                           (image.height, image.width))
      bar.update(len(batch))

  truths = [voc.voc_to_continuous(image.boxes) for image in images]
  hits = [localised(box, truth) for box, truth in zip(predictions, truths)]
  if out_dir is not None:
    _write_pictures(out_dir, images, predictions)
  return {
      "CorLoc": corloc(predictions, truths),
      "num_images": len(images),
      "num_localised": sum(hits),
      "boxes": {image.image_id: [round(float(v), 3) for v in voc.continuous_to_voc(box)]
                for image, box in zip(images, predictions)},
      "box_convention": "VOC: 1-based pixel indices, both ends inclusive",
      "split": split,
      "settings": {"k_patches": k_patches, "short_side": short_side, "patch_size": patch_size,
                   "iou_threshold": IOU_THRESHOLD},
  }


def _write_pictures(out_dir: str, images: Sequence[voc.VocImage],
                    predictions: Sequence[np.ndarray]) -> None:
  """OUT/pictures/ID.png of the first NUM_PICTURES images (truth green, prediction red)."""
  os.makedirs(os.path.join(out_dir, PICTURES_DIR), exist_ok=True)
  for image, box in list(zip(images, predictions))[:NUM_PICTURES]:
    picture = draw_boxes(_prepare(image, (image.height, image.width),
                                  (image.height, image.width)),
                         image.boxes, voc.continuous_to_voc(box))
    path = os.path.join(out_dir, PICTURES_DIR, f"{image.image_id}.png")
    Image.fromarray(picture).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


# ---- The evaluator (dora_jax.evaluation.registry): `dora-eval discover`, config.evals.NAME. ----

# Its settings (config.evals.NAME keys, dora-eval discover's flags): LOST's values.
DEFAULTS = {
    "data": "",  # The VOC2007 or VOC2012 folder (JPEGImages, Annotations, ImageSets/Main).
    "split": "trainval",  # ImageSets/Main/SPLIT.txt lists the images.
    "short_side": 0,  # Shorter side resized to this first (0: original size, as LOST).
    "k_patches": 100,  # Lowest-degree patches the seed expansion may reach (LOST's k).
    "batch_size": 8,  # Images (of one padded size) per forward pass.
}
REPORT_FILE = "discover.json"
SCORES = ("CorLoc",)
ERRORS = (voc.VocError,)
DESCRIPTION = "LOST object discovery on PASCAL VOC boxes (CorLoc)."


def add_flags(parser: argparse.ArgumentParser, base) -> None:
  del base  # LOST's values, not the training config's.
  positive = registry.positive_int
  parser.add_argument("--data", required=True, help="The VOC2007 or VOC2012 folder.")
  parser.add_argument("--split", default=DEFAULTS["split"], help="ImageSets/Main/SPLIT.txt.")
  parser.add_argument("--short-side", type=int, default=DEFAULTS["short_side"],
                      help="Shorter side resized to this first (0: original size, as LOST).")
  parser.add_argument("--k-patches", type=positive, default=DEFAULTS["k_patches"],
                      help="Lowest-degree patches the seed expansion may reach.")
  parser.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"],
                      help="Images (of one padded size) per step.")


class Evaluator:
  """CorLoc with `DEFAULTS`' settings; see `registry` for the interface."""

  def __init__(self, values: Mapping[str, Any], *, name_of: Callable[[str], str],
               run: registry.Run | None = None):
    del run  # The images are decoded at each run.
    self.values, self.name_of = dict(values), name_of
    if not values["data"]:
      raise registry.SettingError(f"{name_of('data')} is empty: give a VOC2007 or VOC2012 "
                                  "folder.")
    registry.check_positive(values, ("k_patches", "batch_size"), name_of)
    voc.list_images(values["data"], values["split"])  # Checks the folder.

  def check(self, size) -> None:
    short_side = self.values["short_side"]
    if short_side < 0 or short_side % size.patch_size:
      raise registry.SettingError(
          f"{self.name_of('short_side')} {short_side} must be 0 (original size) or a multiple "
          f"of the checkpoint's patch size {size.patch_size}, so that its patch grid tiles it.")

  def run(self, backbone, *, out_dir: str | None = None, progress: bool = False) -> dict:
    self.check(backbone.size)
    v = self.values
    report = evaluate_discovery(backbone, v["data"], out_dir, split=v["split"],
                                short_side=v["short_side"], k_patches=v["k_patches"],
                                batch_size=v["batch_size"], progress=progress)
    return dict(report, data=os.path.abspath(v["data"]))

  def summary(self, report: dict) -> str:
    return (f"LOST CorLoc {report['CorLoc']:.2f}% ({report['num_localised']}/"
            f"{report['num_images']} images of {report['split']})")
