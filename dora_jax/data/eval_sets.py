"""Evaluation sets in the public datasets' layouts, from frames with object masks (the synthetic
walking tour's `load_masks`), so `dora-eval seg` and `dora-eval discover` read them as they read
ADE20K and PASCAL VOC.

  write_ade20k_layout   ROOT/images/SPLIT/NAME.jpg, ROOT/annotations/SPLIT/NAME.png (labels:
                        1 background, 2 + class index per object kind; 0 "other" unused),
                        ROOT/class_names.txt (one per label 1..C, as `evaluation.seg_data` reads)
  write_voc_layout      ROOT/JPEGImages/NAME.jpg, ROOT/Annotations/NAME.xml (one <object> per
                        visible object: name, bndbox with 1-based inclusive pixel coordinates),
                        ROOT/ImageSets/Main/trainval.txt

Shapes: F frames, H x W pixels, K objects. No jax here (the data layer).
"""
from __future__ import annotations

import os
from typing import Sequence
from xml.etree import ElementTree

import numpy as np
from PIL import Image

BACKGROUND_LABEL = 1  # ADE layout: 0 is "other" (ignored by the readout), so the sky/street is 1.
CLASS_NAMES_FILE = "class_names.txt"
VOC_SET = os.path.join("ImageSets", "Main", "trainval.txt")


def _check(frames: np.ndarray, masks: np.ndarray, object_classes: np.ndarray) -> None:
  if frames.ndim != 4 or frames.shape[-1] != 3 or masks.shape != frames.shape[:3]:
    raise ValueError(f"frames {frames.shape} and masks {masks.shape}: expected (F, H, W, 3) "
                     "and (F, H, W).")
  if masks.size and int(masks.max()) > len(object_classes):
    raise ValueError(f"masks hold object id {int(masks.max())} but object_classes has "
                     f"{len(object_classes)} entries (ids are 1..K).")


def ade20k_labels(masks: np.ndarray, object_classes: Sequence[int]) -> np.ndarray:
  """Object ids (..., H, W) (0 background, 1..K) -> ADE-layout labels: 1 background, 2 + the
  object's class index. uint8."""
  lookup = np.concatenate([[BACKGROUND_LABEL],
                           2 + np.asarray(object_classes, np.int64)]).astype(np.uint8)
  return lookup[np.asarray(masks)]


def write_ade20k_layout(frames: np.ndarray, masks: np.ndarray, object_classes: Sequence[int],
                        root: str, split: str, *, class_names: Sequence[str] | None = None,
                        prefix: str = "", quality: int = 95) -> list[str]:
  """Writes frames and their semantic labels in the ADE20K layout (see the module docstring).

  Args:
    frames: (F, H, W, 3) uint8; masks: (F, H, W) object ids 0..K; object_classes: (K,) class
      index of each object.
    root: the dataset folder; split: "training" or "validation".
    class_names: names of the class indices; writes ROOT/class_names.txt ("background" first).
    prefix: prepended to the file names (NAME = PREFIX + 5-digit frame number), so several
      tours share a split.
    quality: JPEG quality.

  Returns:
    The names written.
  """
  frames, masks = np.asarray(frames), np.asarray(masks)
  _check(frames, masks, np.asarray(object_classes))
  folders = [os.path.join(root, sub, split) for sub in ("images", "annotations")]
  for folder in folders:
    os.makedirs(folder, exist_ok=True)
  labels = ade20k_labels(masks, object_classes)
  names = [f"{prefix}{index:05d}" for index in range(len(frames))]
  for name, frame, label in zip(names, frames, labels):
    Image.fromarray(frame).save(os.path.join(folders[0], name + ".jpg"), quality=quality)
    Image.fromarray(label).save(os.path.join(folders[1], name + ".png"))
  if class_names is not None:
    with open(os.path.join(root, CLASS_NAMES_FILE), "w") as f:
      f.write("\n".join(["background"] + [str(name) for name in class_names]) + "\n")
  return names


def object_boxes(mask: np.ndarray, object_classes: Sequence[int], *, min_area: int = 1
                 ) -> list[tuple[int, int, tuple[int, int, int, int]]]:
  """(object id, class index, (xmin, ymin, xmax, ymax)) of each object with at least `min_area`
  pixels in `mask` (H, W); VOC's box: 1-based pixel coordinates, both ends inclusive."""
  boxes = []
  for object_id in range(1, len(object_classes) + 1):
    ys, xs = np.nonzero(mask == object_id)
    if len(ys) >= max(min_area, 1):
      boxes.append((object_id, int(object_classes[object_id - 1]),
                    (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
  return boxes


def _voc_xml(name: str, shape: tuple[int, ...], objects: list[tuple[str, tuple[int, ...]]]
             ) -> ElementTree.ElementTree:
  annotation = ElementTree.Element("annotation")
  ElementTree.SubElement(annotation, "folder").text = "VOC"
  ElementTree.SubElement(annotation, "filename").text = name + ".jpg"
  size = ElementTree.SubElement(annotation, "size")
  for key, value in zip(("height", "width", "depth"), shape):
    ElementTree.SubElement(size, key).text = str(value)
  ElementTree.SubElement(annotation, "segmented").text = "0"
  for class_name, box in objects:
    element = ElementTree.SubElement(annotation, "object")
    ElementTree.SubElement(element, "name").text = class_name
    ElementTree.SubElement(element, "pose").text = "Unspecified"
    ElementTree.SubElement(element, "truncated").text = "0"
    ElementTree.SubElement(element, "difficult").text = "0"
    bndbox = ElementTree.SubElement(element, "bndbox")
    for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
      ElementTree.SubElement(bndbox, key).text = str(value)
  tree = ElementTree.ElementTree(annotation)
  ElementTree.indent(tree)
  return tree


def write_voc_layout(frames: np.ndarray, masks: np.ndarray, object_classes: Sequence[int],
                     class_names: Sequence[str], root: str, *, prefix: str = "",
                     min_area: int = 64, quality: int = 95) -> list[str]:
  """Writes frames with their objects' boxes in the PASCAL VOC layout (see the module docstring).

  Objects under `min_area` pixels are left out, and frames with no object left are skipped.
  Names are added to ImageSets/Main/trainval.txt (kept once each, in order), so several tours
  may be written into one ROOT.

  Args:
    frames: (F, H, W, 3) uint8; masks: (F, H, W) object ids 0..K; object_classes: (K,) class
      index of each object; class_names: the names of the class indices.
    root: the dataset folder; prefix: prepended to NAME (PREFIX + 5-digit frame number).
    min_area: the smallest object kept, in pixels; quality: JPEG quality.

  Returns:
    The names written.
  """
  frames, masks = np.asarray(frames), np.asarray(masks)
  _check(frames, masks, np.asarray(object_classes))
  for sub in ("JPEGImages", "Annotations", os.path.dirname(VOC_SET)):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  names = []
  for index, (frame, mask) in enumerate(zip(frames, masks)):
    boxes = object_boxes(mask, object_classes, min_area=min_area)
    if not boxes:
      continue
    name = f"{prefix}{index:05d}"
    Image.fromarray(frame).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=quality)
    objects = [(str(class_names[class_index]), box) for _, class_index, box in boxes]
    _voc_xml(name, frame.shape, objects).write(os.path.join(root, "Annotations", name + ".xml"))
    names.append(name)
  set_path = os.path.join(root, VOC_SET)
  listed = []
  if os.path.isfile(set_path):
    with open(set_path) as f:
      listed = [line.strip() for line in f if line.strip()]
  listed += [name for name in names if name not in set(listed)]
  with open(set_path, "w") as f:
    f.write("".join(name + "\n" for name in listed))
  return names
