"""`dora-eval`: evaluates a trained encoder (the teacher of a `dora-train` run).

  dora-eval knn   --checkpoint RUN --train SRC --val SRC --out DIR [--k 20 --temperature 0.07]
  dora-eval davis --checkpoint RUN --data DAVIS_ROOT --out DIR [--sequences bear dog ...]
  dora-eval track --checkpoint RUN --data SYNTHETIC_TOUR --out DIR [--clips 16 ...]
  dora-eval seg   --checkpoint RUN --data ADE_ROOT --out DIR [--iterations 40000 --blocks 1 ...]
  dora-eval discover --checkpoint RUN --data VOC_ROOT --out DIR [--split trainval --k-patches 100]

RUN: a work folder (its latest checkpoint) or one of its checkpoints/STEP folders. SRC: an image
folder (ROOT/CLASS/IMAGE) or tfds:NAME:SPLIT (read with tfds.data_source, no TensorFlow;
--tfds-data-dir). SYNTHETIC_TOUR: the .mp4 of `dora_jax.data.synthetic` (masks beside it) or its
folder. ADE_ROOT: the ADE20K layout (images/ and annotations/, each with training/ and
validation/), or --train/--val tfds:NAME:SPLIT with a 'segmentation_mask'. VOC_ROOT: a PASCAL
VOC2007/2012 folder (JPEGImages, Annotations, ImageSets/Main). Each writes a JSON report in DIR
(knn.json, davis_metrics.json with the masks and pictures, track.json, seg_metrics.json with
pred/, pictures/ and the readout, discover.json with pictures) and prints a summary. Bad input: a
one-line error and exit status 2. The flags that a training config also has (k-NN, the DoRA
kernels, the clips) default to config_base.py's values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from dora_jax import config_base

KNN_REPORT = "knn.json"
TRACK_REPORT = "track.json"
DISCOVER_REPORT = "discover.json"


class InputError(Exception):
  """Bad input found by the command line; the message is one line."""


def load_backbone(path: str):
  """The one place that loads a trained encoder."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from dora_jax.pretrained import load_backbone as load  # pylint: disable=g-import-not-at-top

  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns about the read-only restore it is asked for.
  try:
    return load(path)
  except FileNotFoundError as e:
    raise InputError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # A checkpoint of another model, or files orbax cannot read.
    lines = str(e).strip().splitlines() or [type(e).__name__]
    raise InputError(f"cannot load --checkpoint {path}: {lines[0]}") from None
  finally:
    logging.set_verbosity(verbosity)


def _write_json(path: str, content: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
  return "n/a" if value is None else f"{value * scale:.{digits}f}"


def run_knn(args: argparse.Namespace) -> str:
  from dora_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import knn  # pylint: disable=g-import-not-at-top

  train = images_lib.open_source(args.train, tfds_data_dir=args.tfds_data_dir)
  val = images_lib.open_source(args.val, tfds_data_dir=args.tfds_data_dir)
  if train.num_classes != val.num_classes:
    raise InputError(f"--train {args.train} has {train.num_classes} classes but --val {args.val} "
                     f"has {val.num_classes}.")
  backbone = load_backbone(args.checkpoint)
  report = knn.evaluate_knn(backbone, train, val, k=args.k, temperature=args.temperature,
                            batch_size=args.batch_size, resize_size=args.resize_size,
                            crop_size=args.crop_size, progress=not args.no_progress,
                            linear_probe=args.linear_probe)
  report["checkpoint"] = os.path.abspath(args.checkpoint)
  path = os.path.join(args.out, KNN_REPORT)
  _write_json(path, report)
  probe = (f", linear probe top-1 {report['linear_top1']:.2f}%" if args.linear_probe else "")
  return (f"k-NN (k={report['k']}, T={report['temperature']}): top-1 {report['top1']:.2f}%, "
          f"top-5 {report['top5']:.2f}%{probe} ({report['num_train']} train, "
          f"{report['num_val']} val images, {report['num_classes']} classes) -> {path}")


def run_davis(args: argparse.Namespace) -> str:
  from dora_jax.evaluation import davis  # pylint: disable=g-import-not-at-top

  davis.list_sequences(args.data, args.sequences, split=args.split)  # Checks before loading.
  backbone = load_backbone(args.checkpoint)
  patch_size = backbone.size.patch_size
  if args.short_side % patch_size or args.size_multiple % patch_size:
    raise InputError(f"--short-side {args.short_side} and --size-multiple {args.size_multiple} "
                     f"must be multiples of the backbone's patch size {patch_size}.")
  settings = davis.PropagationSettings(
      n_last_frames=args.n_last_frames, size_mask_neighborhood=args.size_mask_neighborhood,
      topk=args.topk, temperature=args.temperature, short_side=args.short_side,
      size_multiple=args.size_multiple)
  report = davis.evaluate_davis(backbone, args.data, args.out, sequences=args.sequences,
                                split=args.split, settings=settings, batch_size=args.batch_size,
                                progress=not args.no_progress)
  return (f"DAVIS-2017 ({len(report['sequences'])} sequences, {report['num_objects']} objects): "
          f"J&F {_fmt(report['J&F'])}, J {_fmt(report['J'])}, F {_fmt(report['F'])} -> "
          f"{os.path.join(args.out, davis.METRICS_FILE)}")


def run_track(args: argparse.Namespace) -> str:
  from dora_jax import objects  # pylint: disable=g-import-not-at-top
  from dora_jax import tracking  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import track  # pylint: disable=g-import-not-at-top

  tour = track.load_tour(args.data)  # Checks before loading the checkpoint.
  try:
    threshold = objects.parse_threshold(args.mask_threshold)
  except ValueError:
    raise InputError(f"--mask-threshold {args.mask_threshold!r}: expected a number or one of "
                     f"{', '.join(repr(r) for r in tracking.THRESHOLD_RULES)}.") from None
  backbone = load_backbone(args.checkpoint)
  if args.num_objects > backbone.size.num_heads:
    raise InputError(f"--num-objects {args.num_objects} exceeds the backbone's "
                     f"{backbone.size.num_heads} heads (one head discovers one object).")
  settings = track.TrackSettings(
      num_clips=args.clips, frames_per_clip=args.frames_per_clip, frame_stride=args.frame_stride,
      short_side=args.short_side, size_multiple=args.size_multiple or backbone.size.patch_size,
      dora=objects.DoraOptions(num_objects=args.num_objects, sinkhorn_iters=args.sinkhorn_iters,
                               sinkhorn_epsilon=args.sinkhorn_epsilon,
                               mask_threshold=threshold),
      seed=args.seed)
  report = track.evaluate_tracking(backbone, tour, settings, batch_size=args.batch_size)
  report.update(tour=os.path.abspath(args.data), checkpoint=os.path.abspath(args.checkpoint))
  path = os.path.join(args.out, TRACK_REPORT)
  _write_json(path, report)
  offsets = report["track_iou_per_offset"] or []
  return (f"tracking IoU {_fmt(report['track_iou'])} over {report['num_clips']} clips (per frame "
          f"offset: {' '.join(_fmt(v) for v in offsets)}) -> {path}")


def run_seg(args: argparse.Namespace) -> str:
  from dora_jax.evaluation import seg  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import seg_data  # pylint: disable=g-import-not-at-top

  if bool(args.train) != bool(args.val) or bool(args.data) == bool(args.train):
    raise InputError("give --data ROOT (the ADE20K layout) or both --train and --val "
                     "(tfds:NAME:SPLIT), not both.")
  sources = [seg_data.open_seg_source(spec, split, num_classes=args.num_classes,
                                      tfds_data_dir=args.tfds_data_dir)
             for spec, split in ((args.train or args.data, "training"),
                                 (args.val or args.data, "validation"))]
  backbone = load_backbone(args.checkpoint)
  given = {name: getattr(args, name) for name in ("iterations", "batch_size", "image_size",
                                                  "blocks", "lr", "seed")}
  settings = seg.SegSettings(**{k: v for k, v in given.items() if v is not None})
  patch_size = backbone.size.patch_size
  if settings.image_size % patch_size:
    raise InputError(f"--image-size {settings.image_size} is not a multiple of the checkpoint's "
                     f"patch size {patch_size}; the patch grid must tile the image.")
  if settings.blocks > backbone.size.depth:
    raise InputError(f"--blocks {settings.blocks} exceeds the checkpoint's {backbone.size.depth} "
                     "blocks.")
  report = seg.evaluate_seg(backbone, *sources, settings, out_dir=args.out,
                            progress=not args.no_progress)
  report.update(checkpoint=os.path.abspath(args.checkpoint), train=sources[0].name,
                val=sources[1].name)
  path = os.path.join(args.out, seg.METRICS_FILE)
  _write_json(path, report)
  return (f"linear segmentation ({report['num_classes']} classes, {settings.iterations} "
          f"iterations, {settings.image_size} px): mIoU {_fmt(report['mIoU'], digits=2)}, "
          f"aAcc {_fmt(report['aAcc'], digits=2)}, mAcc {_fmt(report['mAcc'], digits=2)} -> "
          f"{path}")


def run_discover(args: argparse.Namespace) -> str:
  from dora_jax.evaluation import discover  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import voc  # pylint: disable=g-import-not-at-top

  voc.list_images(args.data, args.split)  # Checks before loading the checkpoint.
  backbone = load_backbone(args.checkpoint)
  patch_size = backbone.size.patch_size
  if args.short_side < 0 or args.short_side % patch_size:
    raise InputError(f"--short-side {args.short_side} must be 0 (original size) or a multiple of "
                     f"the checkpoint's patch size {patch_size}, so that its patch grid tiles it.")
  report = discover.evaluate_discovery(backbone, args.data, args.out, split=args.split,
                                       short_side=args.short_side, k_patches=args.k_patches,
                                       batch_size=args.batch_size, progress=not args.no_progress)
  report.update(data=os.path.abspath(args.data), checkpoint=os.path.abspath(args.checkpoint))
  path = os.path.join(args.out, DISCOVER_REPORT)
  _write_json(path, report)
  return (f"LOST CorLoc {report['CorLoc']:.2f}% ({report['num_localised']}/"
          f"{report['num_images']} images of {args.split}) -> {path}")


def _positive_int(value: str) -> int:
  try:
    number = int(value)
  except ValueError:
    number = 0
  if number < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
  return number


def build_parser() -> argparse.ArgumentParser:
  base = config_base.get_base_config()
  parser = argparse.ArgumentParser(
      prog="dora-eval", description="Evaluate the teacher of a dora-train run.")
  commands = parser.add_subparsers(dest="command", required=True,
                                   metavar="{knn,davis,track,seg,discover}")

  def command(name: str, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument("--checkpoint", required=True,
                     help="A dora-train work folder (latest checkpoint) or its checkpoints/STEP.")
    sub.add_argument("--out", required=True, help="Folder for the JSON report (and outputs).")
    sub.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return sub

  knn = command("knn", "DINO's weighted k-NN accuracy on [CLS] features.")
  knn.add_argument("--train", required=True, help="Image folder or tfds:NAME:SPLIT (memory bank).")
  knn.add_argument("--val", required=True, help="Image folder or tfds:NAME:SPLIT (classified).")
  knn.add_argument("--tfds-data-dir", default=None, help="data_dir of tfds sources.")
  knn.add_argument("--k", type=_positive_int, default=base.eval.knn_k,
                   help="Neighbours that vote.")
  knn.add_argument("--temperature", type=float, default=base.eval.knn_temperature,
                   help="Vote temperature.")
  knn.add_argument("--batch-size", type=_positive_int, default=256,
                   help="Images per step over all local devices.")
  knn.add_argument("--resize-size", type=_positive_int, default=base.eval.knn_resize_size,
                   help="Shorter side after the resize.")
  knn.add_argument("--crop-size", type=_positive_int, default=base.eval.knn_crop_size,
                   help="Centre crop side.")
  knn.add_argument("--linear-probe", action="store_true",
                   help="Also fit a linear probe (L-BFGS logistic regression) on the same "
                   "features: linear_top1 in the report.")
  knn.set_defaults(run=run_knn)

  davis = command("davis", "DAVIS-2017 video object segmentation by label propagation (J&F).")
  davis.add_argument("--data", required=True, help="The DAVIS-2017 folder.")
  davis.add_argument("--sequences", nargs="+", default=None,
                     help="Sequences to run (default: ImageSets/2017/SPLIT.txt).")
  davis.add_argument("--split", default="val", help="ImageSets/2017/SPLIT.txt lists sequences.")
  davis.add_argument("--n-last-frames", type=_positive_int, default=7)
  davis.add_argument("--size-mask-neighborhood", type=int, default=12,
                     help="Source patches within this many patches (0: all).")
  davis.add_argument("--topk", type=_positive_int, default=5)
  davis.add_argument("--temperature", type=float, default=0.1)
  davis.add_argument("--short-side", type=_positive_int, default=480,
                     help="Frames resized to this shorter side.")
  davis.add_argument("--size-multiple", type=_positive_int, default=64,
                     help="The longer side rounded down to a multiple of this.")
  davis.add_argument("--batch-size", type=_positive_int, default=8, help="Frames per step.")
  davis.set_defaults(run=run_davis)

  track = command("track", "Tracking IoU of the DoRA kernels on the synthetic walking tour.")
  track.add_argument("--data", required=True,
                     help="The synthetic tour (.mp4 beside its .masks.npz) or its folder.")
  track.add_argument("--clips", type=_positive_int, default=base.eval.track_clips)
  # The synthetic tour's clips, shorter than the config's WT-Venice ones (data.frames_per_clip,
  # data.frame_stride).
  track.add_argument("--frames-per-clip", type=_positive_int, default=4)
  track.add_argument("--frame-stride", type=_positive_int, default=10)
  track.add_argument("--short-side", type=_positive_int, default=base.data.global_size)
  track.add_argument("--size-multiple", type=int, default=0,
                     help="Longer side rounded down to this (0: the patch size).")
  track.add_argument("--num-objects", type=_positive_int, default=base.dora.num_objects)
  track.add_argument("--sinkhorn-iters", type=_positive_int, default=base.dora.sinkhorn_iters)
  track.add_argument("--sinkhorn-epsilon", type=float, default=base.dora.sinkhorn_epsilon)
  track.add_argument("--mask-threshold", default=base.dora.mask_threshold,
                     help="A number, or a rule: 'mean' (of each heat map), 'batch_mean'.")
  track.add_argument("--seed", type=int, default=base.seed, help="Picks the discovery heads.")
  track.add_argument("--batch-size", type=_positive_int, default=32, help="Frames per step.")
  track.set_defaults(run=run_track)

  # Defaults (None) are evaluation.seg.SegSettings's: DINOv2's ADE20K linear head.
  seg = command("seg", "Linear segmentation readout (DINOv2's linear head): mIoU, aAcc, mAcc.")
  seg.add_argument("--data", default=None, help="The ADE20K layout (images/, annotations/).")
  seg.add_argument("--train", default=None, help="Instead of --data: tfds:NAME:SPLIT.")
  seg.add_argument("--val", default=None, help="Instead of --data: tfds:NAME:SPLIT.")
  seg.add_argument("--tfds-data-dir", default=None, help="data_dir of tfds sources.")
  seg.add_argument("--num-classes", type=int, default=0,
                   help="C (0: the class names in ROOT, else ADE20K's 150).")
  seg.add_argument("--iterations", type=_positive_int, default=None, help="Training steps (40000).")
  seg.add_argument("--batch-size", type=_positive_int, default=None, help="Crops per step (16).")
  seg.add_argument("--image-size", type=_positive_int, default=None,
                   help="Crop side, and the evaluation resolution (512).")
  seg.add_argument("--blocks", type=int, choices=(1, 4), default=None,
                   help="Patch tokens of the last n blocks (1).")
  seg.add_argument("--lr", type=float, default=None, help="AdamW's peak lr (1e-3).")
  seg.add_argument("--seed", type=int, default=None, help="Crops and initialisation (0).")
  seg.set_defaults(run=run_seg)

  discover = command("discover", "LOST object discovery on PASCAL VOC boxes (CorLoc).")
  discover.add_argument("--data", required=True, help="The VOC2007 or VOC2012 folder.")
  discover.add_argument("--split", default="trainval", help="ImageSets/Main/SPLIT.txt.")
  discover.add_argument("--short-side", type=int, default=0,
                        help="Shorter side resized to this first (0: original size, as LOST).")
  discover.add_argument("--k-patches", type=_positive_int, default=100,
                        help="Lowest-degree patches the seed expansion may reach.")
  discover.add_argument("--batch-size", type=_positive_int, default=8,
                        help="Images (of one padded size) per step.")
  discover.set_defaults(run=run_discover)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from dora_jax.evaluation import davis  # pylint: disable=g-import-not-at-top
  from dora_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import seg_data  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import track  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import voc  # pylint: disable=g-import-not-at-top

  try:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise InputError(f"--out {args.out} is a file; expected a folder for the report.")
    summary = args.run(args)
  except (InputError, images_lib.SourceError, davis.DavisError, track.TourError,
          voc.VocError, seg_data.SegError) as e:
    print(f"dora-eval {args.command}: error: {e}", file=sys.stderr)
    return 2
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
