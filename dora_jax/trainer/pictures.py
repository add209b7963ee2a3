"""The picture of one clip that shows whether discovery and tracking work.

One column per frame (frame 0 is the anchor, where the objects are discovered). Rows, top to
bottom: the frames; for each tracked object its heat map over the frames (colour map blended on
the frame, the binarised mask outlined in white); the masked views the student sees. numpy and PIL
only.
"""
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dora_jax import paths

# Anchors of a perceptually ordered dark-to-bright colour map (close to matplotlib's 'inferno').
_COLORMAP_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)
# Small frames are enlarged by pixel repetition (patches stay sharp) to at least _MIN_TILE pixels,
# but at most _MAX_SCALE times: the demo's 64-px frames become 192-px tiles, large enough to see
# the objects and the masks' patch grid, and a 4-frame picture stays under 900 px wide; smaller
# frames (the tests' 32 px) show no more when enlarged further, they only make a larger PNG.
_MIN_TILE = 192
_MAX_SCALE = 4
_GAP = 2  # Pixels between tiles.
_LABEL_WIDTH = 96  # Pixels of the label column on the left.


def colormap(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] of any shape (...) -> RGB uint8 (..., 3)."""
  values = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0)
  positions = np.linspace(0.0, 1.0, len(_COLORMAP_ANCHORS))
  channels = [np.interp(values, positions, _COLORMAP_ANCHORS[:, c]) for c in range(3)]
  return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
  """The boundary pixels of a boolean mask (H, W): inside, with a 4-neighbour outside."""
  padded = np.pad(mask, 1, mode="edge")
  interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
  return mask & ~interior


def heatmap_overlays(frames: np.ndarray, heatmaps: np.ndarray,
                     masks: np.ndarray | None = None) -> np.ndarray:
  """Heat maps blended on their frames.

  Args:
    frames: (T, H, W, 3) uint8.
    heatmaps: (T, k, H, W) floats; rescaled per object over all frames, so that a fading object
      looks fainter in later frames. The colour covers the frame in proportion to the heat, so
      the frame stays readable where the object is not.
    masks: optional (T, k, H, W) bool, outlined in white.

  Returns:
    (T, k, H, W, 3) uint8.
  """
  heat = np.asarray(heatmaps, np.float64)
  low = heat.min(axis=(0, 2, 3), keepdims=True)
  high = heat.max(axis=(0, 2, 3), keepdims=True)
  heat = (heat - low) / np.maximum(high - low, 1e-12)
  weight = (0.25 + 0.6 * heat)[..., None]
  blended = (1 - weight) * frames[:, None].astype(np.float64) + weight * colormap(heat)
  overlays = np.round(blended).astype(np.uint8)
  if masks is not None:
    edges = np.vectorize(_outline, signature="(h,w)->(h,w)")(np.asarray(masks, bool))
    overlays[edges] = 255
  return overlays


def make_picture(frames: np.ndarray, heatmaps: np.ndarray, masked_views: np.ndarray,
                 masks: np.ndarray | None = None, title: str = "") -> np.ndarray:
  """The grid of one clip as an (H', W', 3) uint8 image.

  Args:
    frames: (T, H, W, 3) uint8, frame 0 the anchor.
    heatmaps: (T, k, H, W) floats, object i's heat map in frame t.
    masked_views: (T, V, H, W, 3) uint8, the student's views (V = 1 for mask_mode "remove", k for
      "keep").
    masks: optional (T, k, H, W) bool, the binarised heat maps.
    title: a line written above the grid (e.g. the step).
  """
  frames = np.asarray(frames)
  num_frames, height, width, _ = frames.shape
  if heatmaps.shape[0] != num_frames or heatmaps.shape[2:] != (height, width):
    raise ValueError(f"heatmaps has shape {heatmaps.shape}; expected (T={num_frames}, k, "
                     f"H={height}, W={width}) to match frames {frames.shape}.")
  if masked_views.shape[0] != num_frames or masked_views.shape[2:] != (height, width, 3):
    raise ValueError(f"masked_views has shape {masked_views.shape}; expected (T={num_frames}, V, "
                     f"{height}, {width}, 3) to match frames {frames.shape}.")
  overlays = heatmap_overlays(frames, heatmaps, masks)
  rows = [("frames", frames)]
  rows += [(f"object {i + 1}", overlays[:, i]) for i in range(overlays.shape[1])]
  num_views = masked_views.shape[1]
  rows += [("masked view" if num_views == 1 else f"view {v + 1}", masked_views[:, v])
           for v in range(num_views)]

  scale = max(1, min(_MAX_SCALE, -(-_MIN_TILE // min(height, width))))
  tile_h, tile_w = height * scale, width * scale
  title_h = 16 if title else 0
  header_h = 14
  canvas = np.full((title_h + header_h + len(rows) * (tile_h + _GAP),
                    _LABEL_WIDTH + num_frames * (tile_w + _GAP), 3), 255, np.uint8)
  for r, (_, tiles) in enumerate(rows):
    top = title_h + header_h + r * (tile_h + _GAP)
    for t in range(num_frames):
      left = _LABEL_WIDTH + t * (tile_w + _GAP)
      tile = np.repeat(np.repeat(np.asarray(tiles[t], np.uint8), scale, 0), scale, 1)
      canvas[top:top + tile_h, left:left + tile_w] = tile

  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  if title:
    draw.text((4, 2), title, fill=(0, 0, 0), font=font)
  for t in range(num_frames):
    label = "anchor" if t == 0 else f"frame {t}"
    draw.text((_LABEL_WIDTH + t * (tile_w + _GAP) + 2, title_h + 1), label, fill=(0, 0, 0),
              font=font)
  for r, (label, _) in enumerate(rows):
    draw.text((4, title_h + header_h + r * (tile_h + _GAP) + tile_h // 2 - 6), label,
              fill=(0, 0, 0), font=font)
  return np.asarray(image)


def save_picture(path: str, picture: np.ndarray) -> None:
  """Writes an (H, W, 3) uint8 image as PNG, whole or not at all (a local path or a URL)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(picture, np.uint8)).save(buffer, format="PNG")
  paths.write_bytes(path, buffer.getvalue())
