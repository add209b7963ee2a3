r"""The experiment's data: a pretraining tour, and evaluation sets from other tours and objects.

  python experiments/make_eval_data.py --out /tmp/dora_eval_data [--object-tour]

Every tour uses the six object kinds of `synthetic.CLASS_NAMES`. With --object-tour, the
pretraining tour and the held-out tours come from `object_tour.generate_object_tour` (object
instances that enter, cross and leave, in front of many background photos); without it, from
the demo's generator (a few objects over one panorama). Writes, under --out:
  pretrain/walking_tour.mp4, pretrain/shards/  the pretraining tour (seed 0) and its shards
                                               (--pretrain-frames; 0: none)
  views/train/KIND/*.png, views/val/KIND/*.png clean views of single objects by kind (an image
                                               folder for `dora-eval knn --linear-probe`): train
                                               and val show different object instances
  views/backgrounds.json                       the photo behind each view: {"names": [photo],
                                               "train"|"val": {"KIND/NNNNN.png": photo index}}
  views_by_background/{train,val}/PHOTO/*.png  the same views by the photo behind them (the
                                               background probe: `dora-eval knn --linear-probe`)
  pretrain_views/KIND/*.png                    --pretrain-views N: N instances per kind, 8 views
                                               each, other instances (seed 3000): the positive
                                               control's pretraining images (`dora-convert`)
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
--no-eval-sets writes only the pretraining data (pretrain/, pretrain_views/) and `done`.
"""
import argparse
import json
import os

import av
import numpy as np
from PIL import Image

from dora_jax.data import convert
from dora_jax.data import eval_sets
from dora_jax.data import object_tour
from dora_jax.data import synthetic
from dora_jax.evaluation import davis


def _frames(video: str) -> list[np.ndarray]:
  with av.open(video) as container:
    return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


VIEWS_PER_INSTANCE = 8
SEEDS = {"train": 1000, "val": 2000, "pretrain": 3000}  # Views: other seeds, other instances.


def _write_views(views: dict, out_dir: str, labels: str = "labels",
                 names: str = "class_names") -> dict[str, int]:
  """An image folder OUT_DIR/NAME/NNNNN.png of `views`, by views[labels] named by views[names]
  (every name gets its folder, so two splits have the same classes); returns each file's
  background photo index."""
  for name in views[names]:
    os.makedirs(os.path.join(out_dir, str(name)), exist_ok=True)
  backgrounds = {}
  for index, (image, label) in enumerate(zip(views["images"], views[labels])):
    relative = os.path.join(str(views[names][label]), f"{index:05d}.png")
    Image.fromarray(image).save(os.path.join(out_dir, relative))
    backgrounds[relative] = int(views["backgrounds"][index])
  return backgrounds


def _views(num_classes: int, instances: int, size: int, split: str) -> dict:
  return synthetic.render_object_views(
      num_classes=num_classes, instances_per_class=instances,
      views_per_instance=VIEWS_PER_INSTANCE, size=size, seed=SEEDS[split])


def _first_frame_objects(masks: np.ndarray) -> np.ndarray:
  """A DAVIS sequence's object ids (T, H, W): those of frame 0 renumbered 1..n, the rest 0.

  DAVIS scores ids 1..max of the first annotation and follows only the objects it shows; in an
  object tour, ids below that max of objects already gone would score J = 1 for free, and
  objects entering later are not asked for.
  """
  present = np.unique(masks[0])
  present = present[present > 0]
  lookup = np.zeros(int(masks.max()) + 1, np.uint8)
  lookup[present] = np.arange(1, len(present) + 1)
  return lookup[masks]


def _tour(path: str, *, object_tour_kind: bool, num_frames: int, seed: int, num_objects: int,
          num_classes: int) -> dict:
  """A tour of the chosen kind: object_tour's (num_objects lanes) or the demo's."""
  if object_tour_kind:
    return object_tour.generate_object_tour(path, num_frames=num_frames, seed=seed,
                                            objects_at_once=num_objects, num_classes=num_classes)
  return synthetic.generate_walking_tour(path, num_frames=num_frames, seed=seed,
                                         num_objects=num_objects, num_classes=num_classes)


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
  parser.add_argument("--object-tour", action="store_true",
                      help="Make the pretraining and held-out tours with object_tour (objects "
                      "entering and leaving, many backgrounds) instead of the demo's generator.")
  parser.add_argument("--pretrain-views", type=int, default=0,
                      help="Instances per kind in pretrain_views/ (8 views each; 0: none).")
  parser.add_argument("--eval-sets", action=argparse.BooleanOptionalAction, default=True,
                      help="Make the evaluation sets (--no-eval-sets: the pretraining data only).")
  args = parser.parse_args()
  num_classes = len(synthetic.CLASS_NAMES)
  if args.pretrain_frames:
    pretrain = os.path.join(args.out, "pretrain")
    os.makedirs(pretrain, exist_ok=True)
    info = _tour(os.path.join(pretrain, "walking_tour.mp4"), object_tour_kind=args.object_tour,
                 num_frames=args.pretrain_frames, seed=0,
                 num_objects=6 if args.object_tour else 8, num_classes=num_classes)
    convert.convert([info["video"]], os.path.join(pretrain, "shards"), short_side=180,
                    quality=90, frames_per_shard=200, progress=False)
    print(f"pretraining tour: {args.pretrain_frames} frames in {pretrain}/shards")
  if args.pretrain_views:
    views = _views(num_classes, args.pretrain_views, args.view_size, "pretrain")
    _write_views(views, os.path.join(args.out, "pretrain_views"))
    print(f"pretraining views: {len(views['labels'])} images of {args.pretrain_views} "
          f"instances per kind in {args.out}/pretrain_views")
  if args.eval_sets:
    _eval_sets(args, num_classes)
  open(os.path.join(args.out, "done"), "w").close()
  print(f"data in {args.out}")


def _eval_sets(args: argparse.Namespace, num_classes: int) -> None:
  backgrounds = {}
  for split, instances in (("train", args.train_instances), ("val", args.val_instances)):
    views = _views(num_classes, instances, args.view_size, split)
    backgrounds["names"] = [str(name) for name in views["background_names"]]
    backgrounds[split] = _write_views(views, os.path.join(args.out, "views", split))
    _write_views(views, os.path.join(args.out, "views_by_background", split),
                 labels="backgrounds", names="background_names")
    print(f"object views {split}: {len(views['labels'])} images of {num_classes} kinds")
  with open(os.path.join(args.out, "views", "backgrounds.json"), "w") as f:
    json.dump(backgrounds, f, indent=1)
  tours = os.path.join(args.out, "tours")
  os.makedirs(tours, exist_ok=True)
  palette = davis.default_palette()
  sequences = []
  for seed in (101, 102, 103):  # The demo trains on seed 0.
    name = f"tour{seed}"
    info = _tour(os.path.join(tours, f"{name}.mp4"), object_tour_kind=args.object_tour,
                 num_frames=args.num_frames, seed=seed, num_objects=6, num_classes=num_classes)
    frames = _frames(info["video"])
    truth = synthetic.load_masks(info["video"])
    split = "val" if seed == 103 else "train"
    # DAVIS: a sequence of 40 frames, 3 apart, per tour.
    images = os.path.join(args.out, "DAVIS", "JPEGImages", "480p", name)
    annotations = os.path.join(args.out, "DAVIS", "Annotations", "480p", name)
    os.makedirs(images, exist_ok=True)
    os.makedirs(annotations, exist_ok=True)
    davis_frames = range(0, min(len(frames), 120), 3)
    davis_masks = truth["masks"][davis_frames]
    if args.object_tour:
      davis_masks = _first_frame_objects(davis_masks)
    for i, f in enumerate(davis_frames):
      Image.fromarray(frames[f]).save(os.path.join(images, f"{i:05d}.jpg"), quality=95)
      davis.write_indexed_png(os.path.join(annotations, f"{i:05d}.png"), davis_masks[i], palette)
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


if __name__ == "__main__":
  main()
