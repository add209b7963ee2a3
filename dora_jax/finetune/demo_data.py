"""The fine-tuning demo's labelled images: crops of the objects of a new synthetic walking tour.

`dora_jax.data.synthetic` renders a tour with per-frame instance masks and the class of every
object (ball, box, kite). Every `FRAME_EVERY`-th frame, each object visible on at least
`MIN_PIXELS` pixels gives one square crop around its visible part (with a margin, so background
and neighbours come in too), stored as a PNG under `ROOT/SPLIT/CLASS/`. The tour is not the one
the demo backbone trained on (another seed: other objects, another camera path); its first
frames are the training split and its last frames, after a gap, the validation split: the same
objects later in the walk, seen from elsewhere, turned, occluded differently.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile

import av
import numpy as np
from PIL import Image

from dora_jax.data import synthetic

TOUR_SEED = 1  # The demo's pretraining tour is seed 0.
TOUR = dict(num_frames=160, width=320, height=180, fps=30, num_objects=6)
# Frames [start, stop) of each split; the gap keeps validation frames off the training ones.
SPLIT_FRAMES = {"train": (0, 96), "val": (112, 160)}
FRAME_EVERY = 2
MIN_PIXELS = 400  # Smaller visible parts are mostly hidden objects: no crop.
MARGIN = 0.15  # Of the visible box's longer side, added on each side.
CROP_SIZE = 80  # Side of the stored crops (training views are random-resized crops of them).
_SPEC = dict(TOUR, seed=TOUR_SEED, splits=SPLIT_FRAMES, frame_every=FRAME_EVERY,
             min_pixels=MIN_PIXELS, margin=MARGIN, crop_size=CROP_SIZE, version=2)
_SPEC_FILE = "demo_images.json"


def _square_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  """(left, top, right, bottom): a square around the mask's pixels, inside the frame."""
  height, width = mask.shape
  ys, xs = np.nonzero(mask)
  side = (1 + 2 * MARGIN) * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
  side = int(round(min(side, height, width)))
  centre_x, centre_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
  left = int(np.clip(round(centre_x - side / 2), 0, width - side))
  top = int(np.clip(round(centre_y - side / 2), 0, height - side))
  return left, top, left + side, top + side


def _write_splits(root: str, video: str) -> None:
  """Renders the crops of `video` into root/SPLIT/CLASS/."""
  truth = synthetic.load_masks(video)
  names = [str(name) for name in truth["class_names"]]
  for split in SPLIT_FRAMES:
    for name in names:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
  with av.open(video) as container:
    for index, frame in enumerate(container.decode(video=0)):
      split = next((split for split, (start, stop) in SPLIT_FRAMES.items()
                    if start <= index < stop), None)
      if split is None or index % FRAME_EVERY:
        continue
      picture = Image.fromarray(frame.to_ndarray(format="rgb24"))
      for obj, class_id in enumerate(truth["classes"]):
        mask = truth["masks"][index] == obj + 1
        if mask.sum() < MIN_PIXELS:
          continue
        crop = picture.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR, box=_square_box(mask))
        crop.save(os.path.join(root, split, names[class_id],
                               f"frame{index:04d}_object{obj}.png"))


def ensure_demo_images(root: str) -> dict[str, str]:
  """Makes ROOT/train and ROOT/val once (a few seconds); returns {"train": dir, "val": dir}.

  Idempotent and safe against concurrent callers (a file lock); written into a temporary folder
  and renamed, so an interrupted run never leaves a partial dataset that looks complete.
  """
  os.makedirs(root, exist_ok=True)
  folders = {split: os.path.join(root, split) for split in SPLIT_FRAMES}
  spec_path = os.path.join(root, _SPEC_FILE)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if os.path.exists(spec_path):
        with open(spec_path) as f:
          written = json.load(f)
        if written == json.loads(json.dumps(_SPEC)) and all(map(os.path.isdir, folders.values())):
          return folders
      tmp = tempfile.mkdtemp(prefix=".demo_images.tmp-", dir=root)
      try:
        video = os.path.join(tmp, "tour.mp4")
        synthetic.generate_walking_tour(video, seed=TOUR_SEED, **TOUR)
        _write_splits(tmp, video)
        for split, folder in folders.items():
          shutil.rmtree(folder, ignore_errors=True)
          os.rename(os.path.join(tmp, split), folder)
        with open(spec_path + ".tmp", "w") as f:
          json.dump(_SPEC, f)
        os.replace(spec_path + ".tmp", spec_path)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return folders
