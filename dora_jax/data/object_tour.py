"""A pretraining walking tour in which the objects are what views share.

In the demo's tour (`synthetic.generate_walking_tour`) the same few objects stay in view in
front of one panorama of six photos, so the panorama is the easiest thing for a self-supervised
encoder to learn. Here the objects change and the backgrounds vary:

- many instances: objects enter the view from one edge, cross it on a straight path and leave by
  the opposite one; `objects_at_once` lanes each send the next object after a short gap, so a
  long tour holds hundreds of instances, each with its own two colours, size, speed and spin;
- the six kinds of `synthetic.CLASS_NAMES` (shape and texture), in balanced turns;
- sizes log-uniform over `size_range` (fractions of the frame height);
- many backgrounds: the camera pans along a panorama of photos bundled with scikit-image
  (`BACKGROUND_IMAGES`, grayscale ones tinted in a random colour), in a random order, each
  mirrored at random, a new photo about every `frames_per_background` frames.

The files are those of `synthetic.generate_walking_tour` (the video, and `NAME.masks.npz` read by
`synthetic.load_masks`), with the masks' object ids 1..K in uint8 when K <= 255, else uint16, and
two more keys: `backgrounds` int64 (F,) the photo under the centre of each frame (an index into
`background_names`) and `background_names`.

Everything is a deterministic function of the arguments (numpy Generator from `seed`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import av
import numpy as np
from PIL import Image

from dora_jax.data import synthetic

# Photos bundled in scikit-image's wheel (no download). Left out: checkerboard (a kind's
# texture), logo, horse and the phantom (flat drawings), microaneurysms (102 px).
BACKGROUND_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "coins",
                     "brick", "camera", "grass", "gravel", "moon", "page", "text", "clock",
                     "retina", "immunohistochemistry", "colorwheel", "cell", "stereo_motorcycle")
PANORAMA_SCALE = 1.6  # Panorama height / frame height: the camera's zoom has room.


@dataclasses.dataclass(frozen=True)
class TourObject:
  """One object instance: what it is and where it goes (frame pixel coordinates)."""
  first_frame: int  # Frame it enters (its centre one half-diagonal outside the frame).
  last_frame: int  # Frame it has left by (exclusive).
  start: tuple[float, float]  # (x, y) of its centre at first_frame.
  velocity: tuple[float, float]  # px per frame.
  size: int  # Side of its square sprite, px.
  spin: float  # Degrees per frame.
  depth: float  # Nearer (smaller) objects are drawn over farther ones.


def _background_photo(name: str, rng: np.random.Generator) -> np.ndarray:
  """A bundled photo as RGB uint8 (H, W, 3); a grayscale one tinted with a colour from `rng`."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  array = getattr(skdata, name)()
  if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity).
    array = array[0]
  if array.ndim == 2:
    tint = rng.uniform(0.35, 1.0, size=3)
    return (array[..., None].astype(np.float64) * tint).astype(np.uint8)
  return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def _panorama(height: int, num_tiles: int, rng: np.random.Generator
              ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
  """`num_tiles` photos side by side, `height` rows each: the panorama, the column where each
  tile starts (num_tiles,) and each tile's photo (num_tiles,) (index into BACKGROUND_IMAGES)."""
  order = np.concatenate([rng.permutation(len(BACKGROUND_IMAGES))
                          for _ in range(-(-num_tiles // len(BACKGROUND_IMAGES)))])[:num_tiles]
  tiles = []
  for photo in order:
    tile = Image.fromarray(_background_photo(BACKGROUND_IMAGES[photo], rng))
    tile = tile.resize((max(1, round(tile.width * height / tile.height)), height), Image.BILINEAR)
    if rng.uniform() < 0.5:
      tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
    tiles.append(tile)
  panorama = Image.new("RGB", (sum(t.width for t in tiles), height))
  starts = np.cumsum([0] + [t.width for t in tiles[:-1]])
  for tile, x in zip(tiles, starts):
    panorama.paste(tile, (int(x), 0))
  return panorama, starts, order.astype(np.int64)


def _lane(num_frames: int, width: int, height: int, fps: float, size_range: tuple[float, float],
          rng: np.random.Generator) -> list[TourObject]:
  """One lane's objects, one after another: each crosses the frame edge to opposite edge."""
  objects = []
  frame = int(rng.integers(0, 30))  # Lanes start at different times.
  while frame < num_frames:
    size = int(round(height * np.exp(rng.uniform(*np.log(size_range)))))
    reach = size * 0.75  # Half the diagonal of a turned sprite: wholly outside the frame.
    speed = rng.uniform(0.6, 1.6) * height / fps  # px per frame.
    if rng.uniform() < 0.7:  # Across (the longer way) ...
      ys = rng.uniform(0.1, 0.9, size=2) * height
      start, end = np.array([-reach, ys[0]]), np.array([width + reach, ys[1]])
    else:  # ... or down.
      xs = rng.uniform(0.1, 0.9, size=2) * width
      start, end = np.array([xs[0], -reach]), np.array([xs[1], height + reach])
    if rng.uniform() < 0.5:
      start, end = end, start
    duration = max(1, int(np.ceil(np.linalg.norm(end - start) / speed)))
    velocity = (end - start) / duration
    objects.append(TourObject(
        first_frame=frame, last_frame=frame + duration, start=(float(start[0]), float(start[1])),
        velocity=(float(velocity[0]), float(velocity[1])), size=size,
        spin=float(rng.uniform(-3.0, 3.0)), depth=float(rng.uniform())))
    frame += duration + int(rng.integers(0, max(1, int(fps) // 2)))  # A gap under 1/2 s.
  return objects


def plan_objects(*, num_frames: int, width: int, height: int, fps: float, objects_at_once: int,
                 size_range: tuple[float, float], num_classes: int, rng: np.random.Generator
                 ) -> tuple[list[TourObject], np.ndarray, np.ndarray]:
  """Every object of a tour, in order of entry; their kinds (K,) and colours (K, 2, 3)."""
  objects = [o for _ in range(objects_at_once)
             for o in _lane(num_frames, width, height, fps, size_range, rng)]
  objects.sort(key=lambda o: (o.first_frame, o.depth))
  turns = -(-len(objects) // num_classes)
  classes = np.concatenate([np.zeros(0, np.int64)] + [rng.permutation(num_classes)
                                                      for _ in range(turns)])[:len(objects)]
  colours = np.array([synthetic.random_colours(rng) for _ in objects], np.int64).reshape(-1, 2, 3)
  return objects, classes.astype(np.int64), colours


class ObjectTour:
  """A planned tour that draws any of its frames: the camera's window on the panorama, then the
  objects (`objects`, their `classes` (K,)); `backgrounds` (F,): the photo under each frame's
  centre. The objects and the scene draw from two streams of `seed`, so a tour without objects
  (objects_at_once=0) shows the same camera path over the same panorama."""

  def __init__(self, *, num_frames: int, width: int, height: int, fps: float,
               objects_at_once: int, size_range: tuple[float, float], num_classes: int,
               frames_per_background: int, seed: int):
    objects_rng, rng = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    self.width, self.height = width, height
    self.objects, self.classes, colours = plan_objects(
        num_frames=num_frames, width=width, height=height, fps=fps,
        objects_at_once=objects_at_once, size_range=size_range, num_classes=num_classes,
        rng=objects_rng)
    self.sprites = [synthetic.object_sprite(int(c), o.size, colours[i])
                    for i, (c, o) in enumerate(zip(self.classes, self.objects))]
    pano_height = int(round(height * PANORAMA_SCALE))
    num_tiles = max(2, int(np.ceil(num_frames / frames_per_background)) + 1)
    self.panorama, starts, order = _panorama(pano_height, num_tiles, rng)
    # Camera: a window of height pano_height * zoom sweeping the panorama from the first tile's
    # middle to the last's, with a slow zoom and a vertical sway.
    t = np.arange(num_frames, dtype=np.float64) / max(num_frames - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    zoom = 0.75 + 0.2 * np.sin(2 * np.pi * 0.05 * num_frames / fps * t + phase[0])
    self.view_h = zoom * pano_height
    self.view_w = self.view_h * width / height
    first, last = starts[0] + self.view_w.max() / 2, self.panorama.width - self.view_w.max() / 2
    self.cx = first + t * max(last - first, 0.0)
    self.cy = pano_height / 2 + (pano_height - self.view_h) / 2 * 0.8 * np.sin(
        2 * np.pi * 0.03 * num_frames / fps * t + phase[1])
    self.backgrounds = order[np.searchsorted(starts, self.cx, side="right") - 1]
    self.mask_dtype = np.uint8 if len(self.objects) <= 255 else np.uint16

  def frame(self, f: int, *, draw_objects: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Frame f: RGB (H, W, 3) uint8 and its object ids (H, W) (0 background, i + 1 object i)."""
    box = (self.cx[f] - self.view_w[f] / 2, self.cy[f] - self.view_h[f] / 2,
           self.cx[f] + self.view_w[f] / 2, self.cy[f] + self.view_h[f] / 2)
    image = self.panorama.resize((self.width, self.height), Image.BILINEAR, box=box)
    instance = np.zeros((self.height, self.width), self.mask_dtype)
    if not draw_objects:
      return np.asarray(image), instance
    present = [i for i, o in enumerate(self.objects) if o.first_frame <= f < o.last_frame]
    for i in sorted(present, key=lambda i: -self.objects[i].depth):  # Far ones first.
      o = self.objects[i]
      sprite = self.sprites[i].rotate(o.spin * (f - o.first_frame), resample=Image.BILINEAR,
                                      expand=True)
      elapsed = f - o.first_frame
      x0 = int(round(o.start[0] + o.velocity[0] * elapsed - sprite.width / 2))
      y0 = int(round(o.start[1] + o.velocity[1] * elapsed - sprite.height / 2))
      image.paste(sprite, (x0, y0), sprite)
      alpha = np.asarray(sprite.getchannel("A")) > 127
      ys = slice(max(0, y0), min(self.height, y0 + sprite.height))
      xs = slice(max(0, x0), min(self.width, x0 + sprite.width))
      if ys.start < ys.stop and xs.start < xs.stop:
        inside = alpha[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        instance[ys, xs][inside] = i + 1
    return np.asarray(image), instance


def generate_object_tour(path_mp4: str, *, num_frames: int = 3000, width: int = 320,
                         height: int = 180, fps: float = 30, objects_at_once: int = 6,
                         size_range: tuple[float, float] = (0.15, 0.6),
                         num_classes: int = len(synthetic.CLASS_NAMES),
                         frames_per_background: int = 150, seed: int = 0, crf: int = 18,
                         gop: int | None = None, preset: str = "veryfast") -> dict[str, Any]:
  """Writes an object tour to `path_mp4` (H.264) and its masks to `*.masks.npz`.

  Args:
    path_mp4: the video to write; the masks go to `synthetic.masks_path_for(path_mp4)`.
    num_frames, width, height, fps: the video (width and height even, for yuv420p).
    objects_at_once: lanes of objects, each sending one object after another (about this many
      objects are in view at any time).
    size_range: (smallest, largest) sprite side as a fraction of the frame height, log-uniform.
    num_classes: object kinds used, the first of `synthetic.CLASS_NAMES`, in balanced turns.
    frames_per_background: about how many frames the camera spends on each background photo.
    seed: everything random comes from `np.random.default_rng(seed)`.
    crf, gop: H.264 quality and keyframe interval (None: the encoder's default, 250).
    preset: libx264's speed preset (veryfast: a 3000-frame tour encodes in ~1/3 of the time of
      the default, medium, at about the same size).

  Returns:
    {'video', 'masks' (paths), 'num_frames', 'width', 'height', 'fps', 'classes' (K,),
     'class_names', 'num_instances' K, 'backgrounds' (F,), 'background_names'}.
  """
  if width % 2 or height % 2 or width < 16 or height < 16:
    raise ValueError(f"width and height must be even and >= 16 for H.264, got {width}x{height}")
  if num_frames < 1 or objects_at_once < 0 or frames_per_background < 1:
    raise ValueError(f"need num_frames >= 1, objects_at_once >= 0 and frames_per_background >= 1,"
                     f" got {num_frames}, {objects_at_once}, {frames_per_background}")
  if not 1 <= num_classes <= len(synthetic.CLASS_NAMES):
    raise ValueError(f"num_classes must be in 1..{len(synthetic.CLASS_NAMES)}, got {num_classes}")
  if not 0 < size_range[0] <= size_range[1]:
    raise ValueError(f"size_range must be (smallest, largest) with 0 < smallest <= largest, got "
                     f"{size_range}")
  tour = ObjectTour(num_frames=num_frames, width=width, height=height, fps=fps,
                    objects_at_once=objects_at_once, size_range=size_range,
                    num_classes=num_classes, frames_per_background=frames_per_background,
                    seed=seed)
  if len(tour.objects) > np.iinfo(np.uint16).max:
    raise ValueError(f"{len(tour.objects)} objects do not fit uint16 masks: make a shorter "
                     "tour or fewer objects_at_once.")
  masks = np.zeros((num_frames, height, width), tour.mask_dtype)
  container = av.open(path_mp4 + ".tmp.mp4", mode="w")
  try:
    stream = synthetic.add_video_stream(container, width=width, height=height, fps=fps, crf=crf,
                                        gop=gop, preset=preset)
    for f in range(num_frames):
      image, masks[f] = tour.frame(f)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  finally:
    container.close()
  os.replace(path_mp4 + ".tmp.mp4", path_mp4)
  masks_path = synthetic.masks_path_for(path_mp4)
  class_names = synthetic.CLASS_NAMES[:num_classes]
  np.savez_compressed(masks_path + ".tmp.npz", masks=masks, classes=tour.classes,
                      class_names=np.array(class_names), blank=np.zeros(num_frames, bool),
                      backgrounds=tour.backgrounds,
                      background_names=np.array(BACKGROUND_IMAGES))
  os.replace(masks_path + ".tmp.npz", masks_path)
  return {"video": path_mp4, "masks": masks_path, "num_frames": num_frames, "width": width,
          "height": height, "fps": fps, "classes": tour.classes, "class_names": class_names,
          "num_instances": len(tour.objects), "backgrounds": tour.backgrounds,
          "background_names": BACKGROUND_IMAGES}
