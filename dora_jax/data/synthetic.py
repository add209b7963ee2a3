"""A synthetic walking tour with ground truth: for tests, the demo and tracking evaluation.

The camera pans and zooms across a wide panorama built from the natural images that scikit-image
bundles (no download), while textured objects of a few known classes move, turn, change depth
order and so occlude each other. Beside the video `NAME.mp4` the generator writes `NAME.masks.npz`:

    masks        uint8 (F, H, W)  0 = background, i + 1 = object i where it is visible
    classes      int64 (K,)       class of object i (an index into class_names)
    class_names  str (C,)         the class names
    blank        bool (F,)        frames rendered blank (constant), if any were asked for

Everything is a deterministic function of the arguments (numpy Generator from `seed`), the
video's bytes included (see the encoder settings in `generate_walking_tour`).

Command line (also makes the shards):
  python -m dora_jax.data.synthetic --out DIR [--num_frames 300 --width 320 --height 180 ...]
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
from typing import Any, Sequence

import av
import numpy as np
from PIL import Image, ImageDraw

# Object kinds: shape and texture define a kind, colours are drawn per object. ball: circle with
# rings, box: square with checks, kite: triangle with diagonal stripes, star: five-pointed star
# with dots, ring: annulus with radial sectors, cross: plus sign with horizontal bars. Tours use
# the first `num_classes` (3 by default: the demo's).
CLASS_NAMES = ("ball", "box", "kite", "star", "ring", "cross")
_PANORAMA_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "coins")


def _panorama(height: int) -> tuple[Image.Image, np.ndarray]:
  """Bundled scikit-image photos (_PANORAMA_IMAGES) side by side, each resized to `height` rows;
  and the column where each photo starts (len(_PANORAMA_IMAGES),)."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  tiles = []
  for name in _PANORAMA_IMAGES:
    array = getattr(skdata, name)()
    if array.ndim == 2:
      array = np.stack([array] * 3, axis=-1)
    tile = Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))
    tiles.append(tile.resize((max(1, round(tile.width * height / tile.height)), height),
                             Image.BILINEAR))
  panorama = Image.new("RGB", (sum(t.width for t in tiles), height))
  starts = np.cumsum([0] + [t.width for t in tiles[:-1]])
  for tile, x in zip(tiles, starts):
    panorama.paste(tile, (int(x), 0))
  return panorama, starts


def _texture(class_id: int, size: int) -> np.ndarray:
  """The class's two-tone pattern (size, size) of 0/1."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  if class_id == 0:  # ball: concentric rings.
    return (np.hypot(xx - 0.5, yy - 0.5) * 12).astype(int) % 2
  if class_id == 1:  # box: checkerboard.
    return ((xx * 6).astype(int) + (yy * 6).astype(int)) % 2
  if class_id == 2:  # kite: diagonal stripes.
    return ((xx + yy) * 8).astype(int) % 2
  if class_id == 3:  # star: a grid of dots.
    return (np.hypot((xx * 7) % 1 - 0.5, (yy * 7) % 1 - 0.5) < 0.3).astype(int)
  if class_id == 4:  # ring: radial sectors.
    return (((np.arctan2(yy - 0.5, xx - 0.5) + np.pi) / (2 * np.pi) * 12).astype(int) % 2)
  return (yy * 10).astype(int) % 2  # cross: horizontal bars.


def _silhouette(class_id: int, size: int) -> Image.Image:
  """The class's shape as an 'L' mask (255 inside), size x size."""
  alpha = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(alpha)
  margin = size * 0.04
  centre = size / 2
  if class_id == 0:
    draw.ellipse([margin, margin, size - margin, size - margin], fill=255)
  elif class_id == 1:
    draw.rectangle([size * 0.12, size * 0.12, size * 0.88, size * 0.88], fill=255)
  elif class_id == 2:
    draw.polygon([(size / 2, margin), (size - margin, size - margin), (margin, size - margin)],
                 fill=255)
  elif class_id == 3:
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, centre - margin, (centre - margin) * 0.45)
    draw.polygon([(centre + r * np.cos(a), centre - r * np.sin(a)) for r, a in zip(radii, angles)],
                 fill=255)
  elif class_id == 4:
    draw.ellipse([margin, margin, size - margin, size - margin], fill=255)
    inner = size * 0.3
    draw.ellipse([inner, inner, size - inner, size - inner], fill=0)
  else:
    arm = size * 0.18
    draw.rectangle([centre - arm, margin, centre + arm, size - margin], fill=255)
    draw.rectangle([margin, centre - arm, size - margin, centre + arm], fill=255)
  return alpha


def object_sprite(class_id: int, size: int, colours: np.ndarray) -> Image.Image:
  """An RGBA object of class `class_id`, `size` px square: the class's shape and texture in the
  two RGB `colours` (2, 3) (alpha 255 inside the shape, 0 outside)."""
  pattern = _texture(class_id, size)
  rgb = np.where(pattern[..., None] == 1, colours[0], colours[1]).astype(np.uint8)
  sprite = Image.fromarray(rgb).convert("RGBA")
  sprite.putalpha(_silhouette(class_id, size))
  return sprite


def random_colours(rng: np.random.Generator) -> np.ndarray:
  """An object's two colours (2, 3), as every generator here draws them."""
  return rng.integers(30, 226, size=(2, 3))


def _sprite(class_id: int, size: int, rng: np.random.Generator) -> Image.Image:
  """An RGBA object of class `class_id`, `size` px square, in two colours drawn from `rng`."""
  return object_sprite(class_id, size, random_colours(rng))


def _bounce(start: np.ndarray, velocity: np.ndarray, t: float, low: np.ndarray,
            high: np.ndarray) -> np.ndarray:
  """Position at time t of a point moving at `velocity` that bounces inside [low, high]."""
  span = np.maximum(high - low, 1e-6)
  u = np.mod(start - low + velocity * t, 2 * span)
  return low + np.where(u > span, 2 * span - u, u)


def add_video_stream(container: Any, *, width: int, height: int, fps: float, crf: int,
                     gop: int | None, preset: str | None = None) -> Any:
  """The H.264 stream (yuv420p) of a tour, on an `av` container opened for writing.

  The same arguments give the same bytes (and so the same training data) in every run: one
  encoder thread, and libx264 without its assembly (with it, even one thread gave other bytes
  from process to process, through the macroblock-tree rate control; the C code costs ~4 s of
  CPU for the demo's 300 frames). `crf`: quality; `gop`: keyframe interval (None: 250);
  `preset`: libx264's speed preset (None: its default, medium).
  """
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  stream = container.add_stream(codec, rate=int(round(fps)) if float(fps).is_integer() else fps)
  stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
  stream.codec_context.thread_count = 1
  if codec == "libx264":
    stream.options = {"crf": str(crf), "x264-params": "asm=0"}
    if gop is not None:
      stream.options["g"] = str(gop)
    if preset is not None:
      stream.options["preset"] = preset
  return stream


def generate_walking_tour(path_mp4: str, *, num_frames: int = 300, width: int = 320,
                          height: int = 180, fps: float = 30, num_objects: int = 4, seed: int = 0,
                          num_classes: int = 3, blank_frames: Sequence[int] = (), crf: int = 18,
                          gop: int | None = None) -> dict[str, Any]:
  """Writes a synthetic walking tour to `path_mp4` (H.264) and its masks to `*.masks.npz`.

  Args:
    path_mp4: the video to write; the masks go to the same name with `.masks.npz`.
    num_frames, width, height, fps: the video (width and height even, for yuv420p).
    num_objects: K moving objects, of the first `num_classes` kinds of `CLASS_NAMES` in turn
      (all of them appear when K >= num_classes).
    num_classes: object kinds used, 1 to len(CLASS_NAMES).
    seed: everything random comes from `np.random.default_rng(seed)`.
    blank_frames: frame indices rendered as a constant grey (to test blank-frame dropping).
    crf, gop: H.264 quality and keyframe interval (None: the encoder's default, 250).

  Returns:
    {'video': path, 'masks': path, 'num_frames', 'width', 'height', 'fps', 'classes' (K,),
     'class_names'}.
  """
  if width % 2 or height % 2 or width < 16 or height < 16:
    raise ValueError(f"width and height must be even and >= 16 for H.264, got {width}x{height}")
  if num_frames < 1 or num_objects < 0:
    raise ValueError(f"need num_frames >= 1 and num_objects >= 0, got {num_frames}, {num_objects}")
  if not 1 <= num_classes <= len(CLASS_NAMES):
    raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
  rng = np.random.default_rng(seed)
  pano_height = int(round(height * 1.6))
  panorama, _ = _panorama(pano_height)
  aspect = width / height

  # Camera: a view window of height pano_height * zoom, centred at (cx, cy), sweeping left to right.
  t = np.arange(num_frames, dtype=np.float64) / max(num_frames - 1, 1)
  phase = rng.uniform(0, 2 * np.pi, size=3)
  zoom = 0.75 + 0.2 * np.sin(2 * np.pi * 1.3 * t + phase[0])  # Fraction of the panorama height.
  view_h = zoom * pano_height
  view_w = view_h * aspect
  cx = view_w / 2 + t * (panorama.width - view_w.max()) * 0.9 + 0.03 * width * np.sin(
      2 * np.pi * 3 * t + phase[1])
  cy = pano_height / 2 + (pano_height - view_h) / 2 * 0.8 * np.sin(2 * np.pi * 0.7 * t + phase[2])
  cx = np.clip(cx, view_w / 2, panorama.width - view_w / 2)  # The window stays on the panorama.

  # Objects: class, texture, size, bouncing path, spin and a depth that oscillates.
  classes = np.array([i % num_classes for i in range(num_objects)], np.int64)
  classes = rng.permutation(classes)
  base_size = rng.uniform(0.28, 0.42, size=num_objects) * height
  sprites = [_sprite(int(c), max(8, int(round(2 * s))), rng) for c, s in zip(classes, base_size)]
  low, high = np.array([0.0, 0.0]), np.array([width, height], np.float64)
  start = rng.uniform(low + 0.2 * high, 0.8 * high, size=(num_objects, 2))
  speed = rng.uniform(0.3, 0.8, size=(num_objects, 1)) * height / fps
  direction = rng.uniform(0, 2 * np.pi, size=num_objects)
  velocity = speed * np.stack([np.cos(direction), np.sin(direction)], axis=-1)  # px per frame
  spin = rng.uniform(-3.0, 3.0, size=num_objects)  # degrees per frame
  depth_phase = rng.uniform(0, 2 * np.pi, size=num_objects)
  depth_rate = rng.uniform(0.5, 2.0, size=num_objects)
  blank = np.zeros(num_frames, bool)
  blank[[i for i in blank_frames if 0 <= i < num_frames]] = True

  masks = np.zeros((num_frames, height, width), np.uint8)
  container = av.open(path_mp4 + ".tmp.mp4", mode="w")
  try:
    stream = add_video_stream(container, width=width, height=height, fps=fps, crf=crf, gop=gop)
    for f in range(num_frames):
      if blank[f]:
        image = Image.new("RGB", (width, height), (16, 16, 16))
      else:
        box = (cx[f] - view_w[f] / 2, cy[f] - view_h[f] / 2, cx[f] + view_w[f] / 2,
               cy[f] + view_h[f] / 2)
        image = panorama.resize((width, height), Image.BILINEAR, box=box)
        depth = np.sin(depth_rate * 2 * np.pi * t[f] + depth_phase)
        instance = np.zeros((height, width), np.uint8)
        for i in np.argsort(-depth):  # far (large depth) first, near ones painted over them
          scale = 0.85 + 0.3 * (1 - depth[i]) / 2
          size = max(4, int(round(base_size[i] * scale)))
          sprite = sprites[i].resize((size, size), Image.BILINEAR).rotate(
              spin[i] * f, resample=Image.BILINEAR, expand=True)
          position = _bounce(start[i], velocity[i], f, low, high)
          x0 = int(round(position[0] - sprite.width / 2))
          y0 = int(round(position[1] - sprite.height / 2))
          image.paste(sprite, (x0, y0), sprite)
          alpha = np.asarray(sprite.getchannel("A")) > 127
          ys, xs = slice(max(0, y0), min(height, y0 + sprite.height)), slice(
              max(0, x0), min(width, x0 + sprite.width))
          if ys.start < ys.stop and xs.start < xs.stop:
            sub = alpha[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
            instance[ys, xs][sub] = i + 1
        masks[f] = instance
      frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  finally:
    container.close()
  os.replace(path_mp4 + ".tmp.mp4", path_mp4)
  masks_path = masks_path_for(path_mp4)
  np.savez_compressed(masks_path + ".tmp.npz", masks=masks, classes=classes,
                      class_names=np.array(CLASS_NAMES[:num_classes]), blank=blank)
  os.replace(masks_path + ".tmp.npz", masks_path)
  return {"video": path_mp4, "masks": masks_path, "num_frames": num_frames, "width": width,
          "height": height, "fps": fps, "classes": classes,
          "class_names": CLASS_NAMES[:num_classes]}


def place_object(image: Image.Image, sprite: Image.Image, rng: np.random.Generator) -> None:
  """Pastes `sprite` (RGBA) into the square `image` as the object views show it: scaled to
  0.5-0.8 of the side, turned at random, near the centre (within 0.1 of the side)."""
  size = image.width
  side = max(8, int(round(rng.uniform(0.5, 0.8) * size)))
  view = sprite.resize((side, side), Image.BILINEAR).rotate(
      float(rng.uniform(0, 360)), resample=Image.BILINEAR, expand=True)
  shift = rng.uniform(-0.1, 0.1, size=2) * size
  image.paste(view, (int(round((size - view.width) / 2 + shift[0])),
                     int(round((size - view.height) / 2 + shift[1]))), view)


def render_object_views(*, num_classes: int, instances_per_class: int, views_per_instance: int,
                        size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  """Clean views of single objects, for classifying object kinds (k-NN, linear probe).

  Each instance is one object as a tour would draw it (its kind's shape and texture, its own two
  colours); each view shows it alone, turned and scaled at random, near the centre of a random
  window of the tour's panorama. A different `seed` gives other instances: draw the training and
  the evaluation set from different seeds to split by instance.

  Returns:
    images uint8 (V, size, size, 3), labels int64 (V,) (kind index into CLASS_NAMES),
    instances int64 (V,) (instance index within this call), class_names (num_classes,),
    backgrounds int64 (V,) (the photo behind the object: the one under the window's centre, an
    index into background_names), background_names (the panorama's photos, left to right).
  """
  if not 1 <= num_classes <= len(CLASS_NAMES):
    raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
  rng = np.random.default_rng(seed)
  panorama, starts = _panorama(max(2 * size, 180))
  images, labels, instances, backgrounds = [], [], [], []
  for class_id in range(num_classes):
    for _ in range(instances_per_class):
      sprite = _sprite(class_id, 2 * size, rng)
      for _ in range(views_per_instance):
        window = int(rng.uniform(1.0, 2.0) * size)
        x0 = int(rng.integers(0, panorama.width - window))
        y0 = int(rng.integers(0, panorama.height - window))
        image = panorama.resize((size, size), Image.BILINEAR,
                                box=(x0, y0, x0 + window, y0 + window))
        place_object(image, sprite, rng)
        images.append(np.asarray(image))
        labels.append(class_id)
        instances.append(len(instances) // views_per_instance)
        backgrounds.append(np.searchsorted(starts, x0 + window / 2, side="right") - 1)
  return {"images": np.stack(images), "labels": np.array(labels, np.int64),
          "instances": np.array(instances, np.int64),
          "class_names": np.array(CLASS_NAMES[:num_classes]),
          "backgrounds": np.array(backgrounds, np.int64),
          "background_names": np.array(_PANORAMA_IMAGES)}


def masks_path_for(path_mp4: str) -> str:
  """Where `generate_walking_tour` writes the masks of `path_mp4`."""
  return os.path.splitext(path_mp4)[0] + ".masks.npz"


def load_masks(path_mp4: str) -> dict[str, np.ndarray]:
  """The ground truth of a generated video: masks (F, H, W), classes (K,), class_names, blank."""
  with np.load(masks_path_for(path_mp4)) as data:
    return {key: data[key] for key in data.files}


DEMO_DEFAULTS = dict(num_frames=300, width=320, height=180, fps=30, num_objects=4, seed=0)


def ensure_demo_data(root: str, *, short_side: int = 180, quality: int = 90,
                     frames_per_shard: int = 100, **generate_kwargs) -> str:
  """Generates and converts a small synthetic walking tour under `root` once; returns the data dir.

  `root/walking_tour.mp4` (+ `.masks.npz`) and the shards in `root/shards/`. Idempotent: when
  the shards are complete for the same generation arguments they are reused (seconds otherwise).
  `generate_kwargs` override `DEMO_DEFAULTS` (num_frames, width, height, fps, num_objects, seed).
  """
  spec = dict(DEMO_DEFAULTS, **generate_kwargs)
  os.makedirs(root, exist_ok=True)
  # Several processes of one run (multi-host on one machine) may ask at once: one makes the data.
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return _ensure_demo_data_locked(root, spec, short_side, quality, frames_per_shard)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_demo_data_locked(root: str, spec: dict[str, Any], short_side: int, quality: int,
                             frames_per_shard: int) -> str:
  from dora_jax.data import convert as convert_lib  # pylint: disable=g-import-not-at-top
  from dora_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top

  video = os.path.join(root, "walking_tour.mp4")
  data_dir = os.path.join(root, "shards")
  spec_path = os.path.join(root, "walking_tour.json")
  wanted = {"generate": spec, "short_side": short_side, "quality": quality,
            "frames_per_shard": frames_per_shard}
  previous = None
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      previous = json.load(f)
  if previous == wanted and os.path.exists(video):
    try:
      complete = manifest_lib.all_complete(manifest_lib.read(data_dir))
    except ValueError:  # A damaged manifest: convert again.
      complete = False
    if complete:
      return data_dir
  if previous != wanted:  # Another spec: start over rather than mix two datasets.
    shutil.rmtree(data_dir, ignore_errors=True)
    if os.path.exists(spec_path):
      os.remove(spec_path)
  if previous != wanted or not os.path.exists(video):
    generate_walking_tour(video, **spec)
  convert_lib.convert([video], data_dir, short_side=short_side, quality=quality,
                      frames_per_shard=frames_per_shard, progress=False)
  with open(spec_path + ".tmp", "w") as f:
    json.dump(wanted, f)
  os.replace(spec_path + ".tmp", spec_path)
  return data_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dora_jax.data.synthetic",
      description="Generate a synthetic walking tour (video + masks) and convert it to shards.")
  parser.add_argument("--out", required=True, help="Folder for the video, masks and shards.")
  for key, value in DEMO_DEFAULTS.items():
    parser.add_argument(f"--{key}", type=type(value), default=value)
  parser.add_argument("--short_side", type=int, default=180)
  args = parser.parse_args(argv)
  kwargs = {key: getattr(args, key) for key in DEMO_DEFAULTS}
  data_dir = ensure_demo_data(args.out, short_side=args.short_side, **kwargs)
  print(data_dir)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
