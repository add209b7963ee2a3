r"""Evaluation data made from held-out synthetic walking tours (seeds the demo never trains on).

  python experiments/make_eval_data.py --out /tmp/dora_eval_data

writes, under --out:
  knn/train/CLASS/*.png, knn/val/CLASS/*.png   crops of the tours' objects, by class (an image
                                               folder for `dora-eval knn`); train and val come
                                               from different tours
  DAVIS/                                       the DAVIS-2017 layout (`dora-eval davis`): one
                                               sequence per tour, frames as JPEG, the objects'
                                               masks as palette PNGs, ImageSets/2017/val.txt
  ADE/                                         the ADE20K layout (`dora-eval seg`): every 4th
                                               frame, training from tours 101-102, validation
                                               from 103; labels 1 background, 2 + class
  VOC/                                         the PASCAL VOC layout (`dora-eval discover`):
                                               every 8th frame of every tour, one box per
                                               object of at least 100 pixels, trainval.txt
  tour/walking_tour.mp4 (+ .masks.npz)         a tour for `dora-eval track`
"""
import argparse
import os

import av
import numpy as np
from PIL import Image

from dora_jax.data import eval_sets
from dora_jax.data import synthetic
from dora_jax.evaluation import davis


def _frames(video: str) -> list[np.ndarray]:
  with av.open(video) as container:
    return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _object_crops(frames, masks, classes, class_names, out_dir, every, size, min_pixels):
  """Square crops around each visible object (its mask's bounding box, enlarged by half)."""
  count = 0
  for f in range(0, len(frames), every):
    for object_id in range(1, len(classes) + 1):
      ys, xs = np.nonzero(masks[f] == object_id)
      if len(ys) < min_pixels:
        continue
      cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
      half = max(ys.max() - ys.min(), xs.max() - xs.min()) * 0.75 + 2
      box = [int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half)]
      crop = Image.fromarray(frames[f]).crop(box).resize((size, size), Image.BICUBIC)
      folder = os.path.join(out_dir, str(class_names[classes[object_id - 1]]))
      os.makedirs(folder, exist_ok=True)
      crop.save(os.path.join(folder, f"f{f:04d}_o{object_id}.png"))
      count += 1
  return count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_frames", type=int, default=240)
  parser.add_argument("--crop_size", type=int, default=64)
  args = parser.parse_args()
  tours = os.path.join(args.out, "tours")
  os.makedirs(tours, exist_ok=True)
  palette = davis.default_palette()
  sequences = []
  for seed in (101, 102, 103):  # The demo trains on seed 0.
    name = f"tour{seed}"
    info = synthetic.generate_walking_tour(os.path.join(tours, f"{name}.mp4"),
                                           num_frames=args.num_frames, seed=seed, num_objects=6)
    frames = _frames(info["video"])
    truth = synthetic.load_masks(info["video"])
    split = "val" if seed == 103 else "train"
    count = _object_crops(frames, truth["masks"], truth["classes"], truth["class_names"],
                          os.path.join(args.out, "knn", split), every=4, size=args.crop_size,
                          min_pixels=100)
    print(f"{name}: {count} object crops for k-NN {split}")
    # DAVIS: a sequence of 40 frames, 3 apart, per tour.
    images = os.path.join(args.out, "DAVIS", "JPEGImages", "480p", name)
    annotations = os.path.join(args.out, "DAVIS", "Annotations", "480p", name)
    os.makedirs(images, exist_ok=True)
    os.makedirs(annotations, exist_ok=True)
    for i, f in enumerate(range(0, min(len(frames), 120), 3)):
      Image.fromarray(frames[f]).save(os.path.join(images, f"{i:05d}.jpg"), quality=95)
      davis.write_indexed_png(os.path.join(annotations, f"{i:05d}.png"), truth["masks"][f],
                              palette)
    sequences.append(name)
    ade_split = "validation" if split == "val" else "training"
    every_4 = slice(0, len(frames), 4)
    eval_sets.write_ade20k_layout(np.stack(frames[every_4]), truth["masks"][every_4],
                                  truth["classes"], os.path.join(args.out, "ADE"), ade_split,
                                  class_names=truth["class_names"], prefix=f"{name}_")
    every_8 = slice(0, len(frames), 8)
    boxed = eval_sets.write_voc_layout(np.stack(frames[every_8]), truth["masks"][every_8],
                                       truth["classes"], truth["class_names"],
                                       os.path.join(args.out, "VOC"), prefix=f"{name}_",
                                       min_area=100)
    print(f"{name}: ADE {ade_split} and {len(boxed)} VOC images")
  sets = os.path.join(args.out, "DAVIS", "ImageSets", "2017")
  os.makedirs(sets, exist_ok=True)
  with open(os.path.join(sets, "val.txt"), "w") as f:
    f.write("\n".join(sequences) + "\n")
  os.makedirs(os.path.join(args.out, "tour"), exist_ok=True)
  for suffix in (".mp4", ".masks.npz"):
    os.replace(os.path.join(tours, "tour103" + suffix),
               os.path.join(args.out, "tour", "walking_tour" + suffix))
  print(f"evaluation data in {args.out}")


if __name__ == "__main__":
  main()
