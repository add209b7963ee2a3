r"""Clean object views on other backgrounds: pretraining images for the positive control.

  python experiments/control_views.py --out /tmp/control_views --instances 200 --seed 4000
  dora-convert /tmp/control_views --out /tmp/control_shards --short-side 64

The object of each view is drawn as `synthetic.render_object_views` draws it (its kind's shape
and texture, its own two colours, turned and scaled near the centre), but the background is a
random window of one of 16 bundled scikit-image pictures that the evaluation's panorama does not
use (grayscale ones tinted between two random colours, turned by a multiple of 90 degrees), so
that what the views of one kind share is the object, and nothing of the evaluation views'
backgrounds is seen in pretraining. Writes OUT/KIND/NNNNN.png (an image folder for
`dora-convert`) and, with --sample PNG, the views of the first instance of each kind (a row each).
"""
import argparse
import os

import numpy as np
from PIL import Image

from dora_jax.data import synthetic

# Bundled with scikit-image (no download), none of them in the evaluation views' panorama.
BACKGROUNDS = ("brick", "camera", "cell", "clock", "colorwheel", "grass", "gravel", "horse",
               "immunohistochemistry", "moon", "page", "text", "retina", "checkerboard",
               "binary_blobs", "shepp_logan_phantom")


def _pictures() -> list[np.ndarray]:
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  pictures = []
  for name in BACKGROUNDS:
    array = np.asarray(getattr(skdata, name)())
    if array.dtype == bool:
      array = array.astype(np.uint8) * 255
    pictures.append(array[..., :3].astype(np.uint8) if array.ndim == 3 else array.astype(np.uint8))
  return pictures


def _background(pictures: list[np.ndarray], size: int, rng: np.random.Generator) -> Image.Image:
  picture = pictures[rng.integers(len(pictures))]
  height, width = picture.shape[:2]
  window = int(rng.uniform(0.25, 0.8) * min(height, width))
  y0, x0 = rng.integers(0, height - window + 1), rng.integers(0, width - window + 1)
  crop = picture[y0:y0 + window, x0:x0 + window].astype(np.float32)
  if crop.ndim == 2:  # Tinted between two random colours.
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    crop = crop[..., None] / 255.0 * high + (1 - crop[..., None] / 255.0) * low
  crop = np.rot90(crop, rng.integers(4))
  return Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((size, size),
                                                                          Image.BILINEAR)


def render(*, instances_per_class: int, views_per_instance: int, size: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """images uint8 (V, size, size, 3) and labels int64 (V,), instance by instance."""
  pictures = _pictures()
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for class_id in range(len(synthetic.CLASS_NAMES)):
    for _ in range(instances_per_class):
      sprite = synthetic.object_sprite(class_id, 2 * size, synthetic.random_colours(rng))
      for _ in range(views_per_instance):
        image = _background(pictures, size, rng)
        synthetic.place_object(image, sprite, rng)
        images.append(np.asarray(image))
        labels.append(class_id)
  return np.stack(images), np.array(labels, np.int64)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--instances", type=int, default=200, help="Instances per kind.")
  parser.add_argument("--views", type=int, default=8, help="Views per instance.")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=4000,
                      help="Other than the evaluation views' seeds (1000, 2000).")
  parser.add_argument("--sample", default="",
                      help="Also write this PNG: the first instance of each kind, a row each.")
  args = parser.parse_args()
  images, labels = render(instances_per_class=args.instances, views_per_instance=args.views,
                          size=args.size, seed=args.seed)
  for index, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(args.out, synthetic.CLASS_NAMES[label])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))
  if args.sample:
    per_kind = args.instances * args.views
    rows = [np.concatenate(images[k * per_kind:k * per_kind + args.views], axis=1)
            for k in range(len(synthetic.CLASS_NAMES))]
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.sample)
  print(f"{len(images)} views of {args.instances} instances per kind in {args.out}")


if __name__ == "__main__":
  main()
