"""The fine-tuning demo's labelled images: crops of the objects of two synthetic walking tours.

`dora_jax.data.synthetic` renders a tour with per-frame instance masks and the class of every
object (ball, box, kite). Every `FRAME_EVERY`-th frame, each object visible on at least
`MIN_PIXELS` pixels gives one square crop around its visible part (with a margin, so background
and neighbours come in too), stored as a PNG under `ROOT/SPLIT/CLASS/`. The training and the
validation tours have different seeds, so the validation objects are other instances (colours,
sizes, paths) of the same classes over other parts of the panorama.
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

TOUR_SEEDS = {"train": 1, "val": 2}  # The demo's pretraining tour is seed 0.
TOUR = dict(num_frames=160, width=320, height=180, fps=30, num_objects=6)
FRAME_EVERY = 2
MIN_PIXELS = 400  # Smaller visible parts are mostly hidden objects: no crop.
MARGIN = 0.15  # Of the visible box's longer side, added on each side.
CROP_SIZE = 80  # Side of the stored crops (training views are random-resized crops of them).
_SPEC = dict(TOUR, seeds=TOUR_SEEDS, frame_every=FRAME_EVERY, min_pixels=MIN_PIXELS,
             margin=MARGIN, crop_size=CROP_SIZE, version=1)
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


def _write_split(folder: str, video: str) -> None:
  """Renders the crops of `video` into folder/CLASS/."""
  truth = synthetic.load_masks(video)
  names = [str(name) for name in truth["class_names"]]
  for name in names:
    os.makedirs(os.path.join(folder, name), exist_ok=True)
  with av.open(video) as container:
    for index, frame in enumerate(container.decode(video=0)):
      if index % FRAME_EVERY:
        continue
      picture = Image.fromarray(frame.to_ndarray(format="rgb24"))
      for obj, class_id in enumerate(truth["classes"]):
        mask = truth["masks"][index] == obj + 1
        if mask.sum() < MIN_PIXELS:
          continue
        crop = picture.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR, box=_square_box(mask))
        crop.save(os.path.join(folder, names[class_id], f"frame{index:04d}_object{obj}.png"))


def ensure_demo_images(root: str) -> dict[str, str]:
  """Makes ROOT/train and ROOT/val once (a few seconds); returns {"train": dir, "val": dir}.

  Idempotent and safe against concurrent callers (a file lock); written into a temporary folder
  and renamed, so an interrupted run never leaves a partial dataset that looks complete.
  """
  os.makedirs(root, exist_ok=True)
  folders = {split: os.path.join(root, split) for split in TOUR_SEEDS}
  spec_path = os.path.join(root, _SPEC_FILE)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if os.path.exists(spec_path):
        with open(spec_path) as f:
          if json.load(f) == _SPEC and all(os.path.isdir(d) for d in folders.values()):
            return folders
      tmp = tempfile.mkdtemp(prefix=".demo_images.tmp-", dir=root)
      try:
        for split, seed in TOUR_SEEDS.items():
          video = os.path.join(tmp, f"tour_{split}.mp4")
          synthetic.generate_walking_tour(video, seed=seed, **TOUR)
          _write_split(os.path.join(tmp, split), video)
        for split, folder in folders.items():
          shutil.rmtree(folder, ignore_errors=True)
          os.rename(os.path.join(tmp, split), folder)
        with open(spec_path, "w") as f:
          json.dump(_SPEC, f)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return folders
