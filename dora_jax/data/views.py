"""The views of a clip (docs/DESIGN.md step 1), numpy/OpenCV, driven only by the rng grain hands in.

DoRA (data.global_crops_per_frame = 1). Per clip: one random-resized "pre" crop box
(data.global_pre_scale of the frame area, conceptually resized to data.global_pre_size), inside it
one global box (data.global_scale of the pre-crop) and one horizontal flip, the same for all T
frames. Per frame: colour jitter (brightness, contrast, saturation, hue in random order, as
torchvision's ColorJitter), grayscale and Gaussian blur (as DINO's, sigma ~ data.blur_sigma px),
each with its probability; and M local crops cut from that frame's pre-crop (data.local_scale of
the pre-crop area), each with its own flip (data.local_flip_prob), jitter, grayscale and blur.

DINO (data.global_crops_per_frame = 2, as facebookresearch/dino's DataAugmentationDINO): every
frame is an image with two global crops, each with its own box, flip, jitter and grayscale; the
first blurred with data.global_blur_prob (DINO: 1.0), the second with
data.second_global_blur_prob (0.1) and then solarised (PIL's ImageOps.solarize, threshold 128)
with data.second_global_solarize_prob (0.2). data.global_pre_size = 0 drops the pre-crop: global
and local boxes are then drawn in the whole stored frame, as DINO's RandomResizedCrop does.

Cost matters (this runs for every clip of every step), so: the two nested crops are composed into
one box in stored-frame pixels, and every view is a single antialiased resize from the decoded
JPEG; when every box is much larger than its output the JPEG is decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling); jitter and grayscale, all affine in RGB, become one colour matrix per
view (computed for all views of the clip at once) applied in one pass.

The pixel work is OpenCV's (SIMD; one thread per process), which replaced Pillow's: the same
boxes, flips and random draws from the same rng, but not the same bytes. Measured against the
Pillow code on photos and walking-tour frames (benchmarks/view_primitives.py, BENCHMARKS.md), in
uint8 levels: JPEG decode identical (both libjpeg-turbo); resize 0.14 mean / 1 max when
upscaling (both bilinear at pixel centres), 0.35 mean / 32 max when downscaling (`resize_box`:
a Gaussian prefilter plus bilinear, as blurred as PIL's triangle filter on average, not equal to
it: the large differences sit on hard edges; 1.8% of pixels differ by more than 2 levels);
blur 0.27 mean / 25 max (a true Gaussian cut at 3 sigma, where PIL's GaussianBlur chains box
blurs); colour matrix 0.04 mean / 1 max (rounding); contrast now uses the exact mean colour, not
the mean rounded to whole levels. Whole clips of the paper's views: 0.3 mean, 0.5% of pixels by
more than 2 levels.

Outputs are uint8; normalisation happens on the device. Nothing here imports jax.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from dora_jax import config_base

# One thread per process: grain's input workers are one process per core, and in the trainer's
# process OpenCV's threads would compete with XLA's. At import, so every worker process has it.
cv2.setNumThreads(1)

Box = tuple[float, float, float, float]  # (left, top, width, height) in pixels.


# The `data` keys the views read. config_base.py declares each (what it is, its default, its
# type); `ViewConfig` is built from that declaration, not a copy of it.
VIEW_KEYS = ("global_pre_size", "global_pre_scale", "global_size", "global_scale",
             "global_crops_per_frame", "num_local_crops", "local_size", "local_scale",
             "flip_prob", "local_flip_prob", "color_jitter_prob", "brightness", "contrast",
             "saturation", "hue", "grayscale_prob", "global_blur_prob", "second_global_blur_prob",
             "second_global_solarize_prob", "local_blur_prob", "blur_sigma")


def _typed_like(default: Any, value: Any) -> Any:
  """`value` in the type of config_base's default: a tuple of floats, or the default's type."""
  if isinstance(default, tuple):
    return tuple(float(v) for v in value)
  return type(default)(value)


def _from_config(cls, data_config: Any):
  """The view settings of a config's `data` section (a ConfigDict or a dict)."""
  return cls(**{field.name: _typed_like(field.default, data_config[field.name])
                for field in dataclasses.fields(cls)})


def _view_config_class() -> type:
  defaults = config_base.get_base_config().data
  fields = [(key, type(defaults[key]), dataclasses.field(default=defaults[key]))
            for key in VIEW_KEYS]
  cls = dataclasses.make_dataclass("ViewConfig", fields, frozen=True,
                                   namespace={"from_config": classmethod(_from_config)})
  cls.__module__ = __name__  # Pickled by name into grain's worker processes.
  cls.__doc__ = ("The view settings: the `VIEW_KEYS` of the config's `data` section, with "
                 "config_base.py's defaults and types (`ViewConfig.from_config(config.data)`).")
  return cls


ViewConfig = _view_config_class()


def random_resized_box(rng: np.random.Generator, width: int, height: int,
                       scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
  """A random crop box of `scale` of the area and aspect `ratio` (torchvision's algorithm).

  Integer box inside a (height, width) image; falls back to a central crop after 10 tries.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return float(left), float(top), float(w), float(h)
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return float((width - w) // 2), float((height - h) // 2), float(w), float(h)


def compose_box(outer: Box, outer_size: int, inner: Box) -> Box:
  """`inner`, a box in the `outer_size`-square resize of box `outer`, in the outer's pixels."""
  sx, sy = outer[2] / outer_size, outer[3] / outer_size
  return outer[0] + inner[0] * sx, outer[1] + inner[1] * sy, inner[2] * sx, inner[3] * sy


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L" conversion.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_EYE = np.eye(3)
_TO_GRAY = np.outer(np.ones(3), _LUMA)  # RGB -> (luma, luma, luma).
# A hue turn by angle a in RGB: _HUE_FIXED + cos(a) _HUE_COS + sin(a) _HUE_SIN (YIQ rotation).
_HUE_FIXED = _YIQ_TO_RGB @ np.diag([1.0, 0.0, 0.0]) @ _RGB_TO_YIQ
_HUE_COS = _YIQ_TO_RGB @ np.diag([0.0, 1.0, 1.0]) @ _RGB_TO_YIQ
_HUE_SIN = _YIQ_TO_RGB @ np.array([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]]) @ _RGB_TO_YIQ


def jitter_affines(factors: np.ndarray, orders: np.ndarray,
                   means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Colour jitter of V views as affine maps of RGB: (matrices (V, 3, 3), offsets (V, 3)).

  Args:
    factors: (V, 4) brightness, contrast, saturation, hue per view; the first three multiply
      (1 = no change), hue is a fraction of a turn.
    orders: (V, 4) the order in which the ops 0..3 (brightness, contrast, saturation, hue) apply.
    means: (V, 3) mean colour of each input, needed by contrast.

  Brightness scales; contrast blends with the mean luma of its input; saturation blends each pixel
  with its luma (these three as torchvision/PIL define them); hue rotates the chroma plane of YIQ.
  Each is affine, so the composition is exact, except that the chain of uint8 images that
  torchvision makes would clip and round between the ops.
  """
  num_views = len(factors)
  matrices = np.broadcast_to(_EYE, (num_views, 3, 3)).copy()
  offsets = np.zeros((num_views, 3))
  ones = np.ones(num_views)
  angle = 2 * np.pi * factors[:, 3]
  hue = _HUE_FIXED + np.cos(angle)[:, None, None] * _HUE_COS + np.sin(angle)[:, None, None] * _HUE_SIN
  for position in range(4):  # Every view applies its op at this position; others are identity.
    op = orders[:, position]
    scale = np.where(op == 0, factors[:, 0], ones)  # Brightness.
    matrices *= scale[:, None, None]
    offsets *= scale[:, None]
    contrast = np.where(op == 1, factors[:, 1], ones)
    gray_mean = np.einsum("c,vcd,vd->v", _LUMA, matrices, means) + offsets @ _LUMA
    matrices *= contrast[:, None, None]
    offsets = contrast[:, None] * offsets + ((1 - contrast) * gray_mean)[:, None]
    saturation = np.where(op == 2, factors[:, 2], ones)[:, None, None]
    step = saturation * _EYE + (1 - saturation) * _TO_GRAY
    step = np.where((op == 3)[:, None, None], hue, step)
    matrices = step @ matrices
    offsets = np.einsum("vcd,vd->vc", step, offsets)
  return matrices, offsets


def _draw_colour(rng: np.random.Generator, config: ViewConfig, shape: tuple[int, ...],
                 blur_prob: np.ndarray, solarize_prob: np.ndarray) -> dict[str, np.ndarray]:
  """The colour randomness of views of `shape`: whether and how to jitter, gray, blur, solarise."""
  factors = np.stack([
      rng.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness, shape),
      rng.uniform(max(0.0, 1 - config.contrast), 1 + config.contrast, shape),
      rng.uniform(max(0.0, 1 - config.saturation), 1 + config.saturation, shape),
      rng.uniform(-config.hue, config.hue, shape)], axis=-1)
  return {
      "jitter": rng.uniform(size=shape) < config.color_jitter_prob,
      "factors": factors,
      "orders": rng.permuted(np.broadcast_to(np.arange(4), (*shape, 4)), axis=-1),
      "gray": rng.uniform(size=shape) < config.grayscale_prob,
      "blur": rng.uniform(size=shape) < blur_prob,
      "sigma": rng.uniform(*config.blur_sigma, shape),
      "solarize": rng.uniform(size=shape) < solarize_prob,
  }


def color_affines(draws: dict[str, np.ndarray], means: np.ndarray) -> np.ndarray:
  """(V, 3, 4) affine colour maps (jitter then grayscale) of V views from flat `draws`."""
  factors = np.where(draws["jitter"][:, None], draws["factors"], [1.0, 1.0, 1.0, 0.0])
  matrices, offsets = jitter_affines(factors, draws["orders"], means)
  gray = draws["gray"][:, None, None]
  matrices = np.where(gray, _TO_GRAY @ matrices, matrices)
  offsets = np.where(gray[..., 0], offsets @ _TO_GRAY.T, offsets)
  return np.concatenate([matrices, offsets[..., None]], axis=-1)


# cv2.imdecode flags for 1/1, 1/2, 1/4, 1/8 scale (libjpeg's DCT scaling), RGB order, and no EXIF
# rotation (the frames are what dora-convert wrote, as PIL reads them).
_DECODE_FLAGS = {scale: reduced | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
                 for scale, reduced in ((1, 0), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
                                        (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                                        (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))}


def _decode(jpeg: bytes, size: tuple[int, int], shrink: float) -> tuple[np.ndarray, float]:
  """The JPEG decoded to (h, w, 3) uint8 RGB, at 1/2^k scale when `shrink` >= 2^k (k <= 3);
  (image, stored px per decoded px).

  (IMREAD_REDUCED_GRAYSCALE_k only selects the scale: with IMREAD_COLOR_RGB the output is RGB.)
  """
  scale = 8 if shrink >= 8 else 4 if shrink >= 4 else 2 if shrink >= 2 else 1
  image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), _DECODE_FLAGS[scale])
  if image is None:
    raise ValueError(f"a stored frame ({len(jpeg)} bytes) is not a JPEG that decodes")
  return image, size[1] / image.shape[1]


def _prefilter(scale: float) -> tuple[int, float]:
  """The Gaussian that antialiases a downscale by `scale`: (kernel size, sigma); (1, 0) if none.

  PIL's antialiased bilinear weights the input with a triangle of half-width `scale` (variance
  scale^2 / 6); bilinear interpolation alone adds on average 1/6 px^2 (x(1-x) over the phase x).
  So the prefilter has variance (scale^2 - 1) / 6: the two together blur as much as PIL's on
  average. Below 0.5 px^2, a sampled Gaussian has much less variance than its sigma^2, so the
  3-tap kernel [e, 1, e] / (1 + 2e) is given exactly that variance (2e / (1 + 2e)).
  """
  variance = (scale * scale - 1) / 6
  if variance <= 1e-4:
    return 1, 0.0
  if variance < 0.5:
    e = variance / (2 * (1 - variance))
    return 3, math.sqrt(-0.5 / math.log(e))
  sigma = math.sqrt(variance)
  return 2 * math.ceil(3 * sigma) + 1, sigma


def resize_box(image: np.ndarray, box: Box, size: int) -> np.ndarray:
  """Antialiased bilinear resize of `box` of `image` (h, w, C) uint8 to (size, size, C).

  Output pixel j samples the input at box_left + (j + 0.5) * box_width / size - 0.5 (pixel
  centres; likewise rows), as PIL's resize with a float box. Upscaling: bilinear interpolation
  there (PIL's BILINEAR, to OpenCV's 1/32-px rounding). Downscaling by s > 1 along an axis:
  first a Gaussian prefilter of the box's neighbourhood along that axis (`_prefilter`), so that
  the result blurs as much as PIL's triangle filter of half-width s on average; it is not that
  filter (the measured difference is in the module docstring).
  """
  left, top, width, height = box
  scale_x, scale_y = width / size, height / size
  (ksize_x, sigma_x), (ksize_y, sigma_y) = _prefilter(scale_x), _prefilter(scale_y)
  # Only the box and what the prefilter and the interpolation reach around it.
  margin_x, margin_y = ksize_x // 2 + 2, ksize_y // 2 + 2
  x0, y0 = max(int(left) - margin_x, 0), max(int(top) - margin_y, 0)
  region = image[y0:min(math.ceil(top + height) + margin_y, image.shape[0]),
                 x0:min(math.ceil(left + width) + margin_x, image.shape[1])]
  if ksize_x > 1 or ksize_y > 1:  # (A 1-tap axis ignores its sigma; 0 would mean "derive it".)
    region = cv2.GaussianBlur(region, (ksize_x, ksize_y), sigmaX=sigma_x or 1.0,
                              sigmaY=sigma_y or 1.0, borderType=cv2.BORDER_REPLICATE)
  to_input = np.array([[scale_x, 0.0, left - x0 + 0.5 * scale_x - 0.5],
                       [0.0, scale_y, top - y0 + 0.5 * scale_y - 0.5]])
  return cv2.warpAffine(region, to_input, (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


def gaussian_blur(view: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur of standard deviation `sigma` px (DINO's blur; kernel cut at 3 sigma), edges
  repeated."""
  ksize = 2 * math.ceil(3 * sigma) + 1
  return cv2.GaussianBlur(view, (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                          borderType=cv2.BORDER_REPLICATE)


# PIL's ImageOps.solarize (DINO's), threshold 128: every level >= 128 inverted.
_SOLARIZE = np.where(np.arange(256) < 128, np.arange(256), 255 - np.arange(256)).astype(np.uint8)


def clip_views(jpegs: Sequence[bytes | Image.Image | np.ndarray], size: tuple[int, int],
               rng: np.random.Generator, config: ViewConfig, *,
               return_boxes: bool = False) -> dict[str, np.ndarray]:
  """The views of one clip.

  Args:
    jpegs: the T frames of the clip, JPEG bytes (or decoded RGB images: PIL or (H, W, 3) uint8),
      all of size `size` = (H, W).
    size: (H, W).
    rng: the only source of randomness (grain's per-element generator).
    config: view settings.
    return_boxes: also return the boxes (stored-frame pixels, (left, top, width, height)).

  Returns:
    'frames': uint8 (T, S, S, 3) global views, S = global_size (DINO: the first global crops);
    'second_frames': uint8 (T, S, S, 3) DINO's second global crops (only when
      global_crops_per_frame == 2);
    'crops': uint8 (T, M, s, s, 3) local crops, s = local_size (absent when M == 0);
    with return_boxes: 'pre_box' (4,) (the whole frame without a pre-crop), 'global_boxes'
    (T, G, 4), 'global_flips' (T, G), 'local_boxes' (T, M, 4), 'local_flips' (T, M).
  """
  height, width = size
  pre_size, num_local = config.global_pre_size, config.num_local_crops
  num_global, num_frames = config.global_crops_per_frame, len(jpegs)
  if pre_size:
    pre_box = random_resized_box(rng, width, height, config.global_pre_scale)
    crop_box = lambda scale: compose_box(pre_box, pre_size,
                                         random_resized_box(rng, pre_size, pre_size, scale))
  else:  # No pre-crop: boxes in the whole frame, as DINO's RandomResizedCrop.
    pre_box = (0.0, 0.0, float(width), float(height))
    crop_box = lambda scale: random_resized_box(rng, width, height, scale)
  if num_global == 1:  # DoRA: one box and one flip for the whole clip, where objects are tracked.
    global_boxes = [[crop_box(config.global_scale)]] * num_frames
    global_flips = np.full((num_frames, 1), rng.uniform() < config.flip_prob)
  else:  # DINO: every global crop of every frame is drawn on its own.
    global_boxes = [[crop_box(config.global_scale) for _ in range(num_global)] for _ in jpegs]
    global_flips = rng.uniform(size=(num_frames, num_global)) < config.flip_prob
  local_boxes = [[crop_box(config.local_scale) for _ in range(num_local)] for _ in jpegs]
  local_flips = rng.uniform(size=(num_frames, num_local)) < config.local_flip_prob
  # How much smaller than the stored frame the JPEG may be decoded: every box keeps >= its output.
  shrink = min(min(min(b[2], b[3]) for boxes in global_boxes for b in boxes) / config.global_size,
               min((min(b[2], b[3]) for boxes in local_boxes for b in boxes),
                   default=math.inf) / max(config.local_size, 1))
  # View (t, g) is frame t's g-th global view, (t, G + m) its m-th local crop.
  views_per_frame = num_global + num_local
  blur_prob = np.array([config.global_blur_prob, config.second_global_blur_prob][:num_global]
                       + [config.local_blur_prob] * num_local)
  solarize_prob = np.array([0.0, config.second_global_solarize_prob][:num_global]
                           + [0.0] * num_local)
  draws = _draw_colour(rng, config, (num_frames, views_per_frame), blur_prob, solarize_prob)
  flat = {key: value.reshape(num_frames * views_per_frame, *value.shape[2:])
          for key, value in draws.items()}
  resized = []
  for jpeg, global_t, local_t in zip(jpegs, global_boxes, local_boxes):
    if isinstance(jpeg, (bytes, bytearray, memoryview)):
      image, factor = _decode(jpeg, size, shrink)
    else:  # Already decoded (the benchmark's reference path): a PIL image or an array.
      image = np.asarray(jpeg.convert("RGB") if isinstance(jpeg, Image.Image) else jpeg)
      factor = 1.0
    scaled = lambda box: tuple(v / factor for v in box)
    resized.extend(resize_box(image, scaled(box), config.global_size) for box in global_t)
    resized.extend(resize_box(image, scaled(box), config.local_size) for box in local_t)
  touched = flat["jitter"] | flat["gray"]
  means = np.array([cv2.mean(v)[:3] if j else (0, 0, 0) for v, j in zip(resized, flat["jitter"])])
  affines = color_affines(flat, means)
  global_views = [np.empty((num_frames, config.global_size, config.global_size, 3), np.uint8)
                  for _ in range(num_global)]
  crops = np.empty((num_frames, num_local, config.local_size, config.local_size, 3), np.uint8)
  flips = np.concatenate([global_flips, local_flips], axis=1).reshape(-1)
  blur, sigma = flat["blur"].tolist(), flat["sigma"].tolist()
  solarize = flat["solarize"].tolist()
  for index, view in enumerate(resized):
    if touched[index]:  # Jitter and grayscale: one affine map per pixel (rounded, clipped).
      view = cv2.transform(view, affines[index])
    if blur[index]:
      view = gaussian_blur(view, sigma[index])
    if solarize[index]:  # After the blur, as DINO; per pixel, so it commutes with the flip.
      view = cv2.LUT(view, _SOLARIZE)
    t, slot = divmod(index, views_per_frame)
    target = global_views[slot][t] if slot < num_global else crops[t, slot - num_global]
    if flips[index]:  # Last: colour ops and the (symmetric) blur commute with it.
      cv2.flip(view, 1, dst=target)
    else:
      target[...] = view
  out = {"frames": global_views[0]}
  if num_global == 2:
    out["second_frames"] = global_views[1]
  if num_local:
    out["crops"] = crops
  if return_boxes:
    out.update(pre_box=np.array(pre_box),
               global_boxes=np.array(global_boxes, np.float64).reshape(num_frames, num_global, 4),
               global_flips=global_flips,
               local_boxes=np.array(local_boxes, np.float64).reshape(num_frames, num_local, 4),
               local_flips=local_flips)
  return out


class ClipViews:
  """grain random map: a `ClipSource` element and the element's rng -> the clip's views.

  With `with_clip_ids`, the output also holds 'video' (the video number) and 'frames' (T,) (its
  stored frame numbers): which clip it was, for tests and pictures.
  """

  def __init__(self, config: ViewConfig, with_clip_ids: bool = False):
    self.config = config
    self.with_clip_ids = with_clip_ids

  def __call__(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = clip_views(element["jpegs"], element["size"], rng, self.config)
    if self.with_clip_ids:
      out["video"] = np.int32(element["video"])
      out["frames"] = np.asarray(element["frames"], np.int32)
    return out

  def __repr__(self) -> str:
    return f"ClipViews({self.config})"
