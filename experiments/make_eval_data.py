r"""The experiment's data: a pretraining tour, and evaluation sets from other tours and objects.

  python experiments/make_eval_data.py --out /tmp/dora_eval_data

Every tour uses the six object kinds of `synthetic.CLASS_NAMES`. Writes, under --out:
  pretrain/walking_tour.mp4, pretrain/shards/  the pretraining tour (seed 0) and its shards
                                               (--pretrain-frames; 0: none)
  views/train/KIND/*.png, views/val/KIND/*.png clean views of single objects by kind (an image
                                               folder for `dora-eval knn --linear-probe`): train
                                               and val show different object instances
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
  done                                         written last: the set is complete
"""
import argparse
import os

import av
import numpy as np
from PIL import Image

from dora_jax.data import convert
from dora_jax.data import eval_sets
from dora_jax.data import synthetic
from dora_jax.evaluation import davis


def _frames(video: str) -> list[np.ndarray]:
  with av.open(video) as container:
    return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _write_views(views: dict, out_dir: str) -> None:
  for index, (image, label) in enumerate(zip(views["images"], views["labels"])):
    folder = os.path.join(out_dir, str(views["class_names"][label]))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_frames", type=int, default=240, help="Frames of each held-out tour.")
  parser.add_argument("--pretrain-frames", type=int, default=600,
                      help="Frames of the pretraining tour (0: no pretraining tour).")
  parser.add_argument("--view-size", type=int, default=64, help="Side of the object views.")
  parser.add_argument("--train-instances", type=int, default=20,
                      help="Object instances per kind in views/train (8 views each).")
  parser.add_argument("--val-instances", type=int, default=10,
                      help="Other instances per kind in views/val (8 views each).")
  args = parser.parse_args()
  num_classes = len(synthetic.CLASS_NAMES)
  if args.pretrain_frames:
    pretrain = os.path.join(args.out, "pretrain")
    os.makedirs(pretrain, exist_ok=True)
    info = synthetic.generate_walking_tour(
        os.path.join(pretrain, "walking_tour.mp4"), num_frames=args.pretrain_frames, seed=0,
        num_objects=8, num_classes=num_classes)
    convert.convert([info["video"]], os.path.join(pretrain, "shards"), short_side=180,
                    quality=90, frames_per_shard=200, progress=False)
    print(f"pretraining tour: {args.pretrain_frames} frames in {pretrain}/shards")
  for split, seed, instances in (("train", 1000, args.train_instances),
                                 ("val", 2000, args.val_instances)):
    views = synthetic.render_object_views(
        num_classes=num_classes, instances_per_class=instances, views_per_instance=8,
        size=args.view_size, seed=seed)
    _write_views(views, os.path.join(args.out, "views", split))
    print(f"object views {split}: {len(views['labels'])} images of {num_classes} kinds")
  tours = os.path.join(args.out, "tours")
  os.makedirs(tours, exist_ok=True)
  palette = davis.default_palette()
  sequences = []
  for seed in (101, 102, 103):  # The demo trains on seed 0.
    name = f"tour{seed}"
    info = synthetic.generate_walking_tour(os.path.join(tours, f"{name}.mp4"),
                                           num_frames=args.num_frames, seed=seed, num_objects=6,
                                           num_classes=num_classes)
    frames = _frames(info["video"])
    truth = synthetic.load_masks(info["video"])
    split = "val" if seed == 103 else "train"
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
  open(os.path.join(args.out, "done"), "w").close()
  print(f"evaluation data in {args.out}")


if __name__ == "__main__":
  main()
