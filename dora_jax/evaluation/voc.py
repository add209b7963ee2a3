"""PASCAL VOC detection layout (VOC2007 and VOC2012 alike): images, boxes, box conventions.

Layout read: ROOT/JPEGImages/ID.jpg, ROOT/Annotations/ID.xml, ROOT/ImageSets/Main/SPLIT.txt
(one image id per line). From each XML: the image size (size/width, size/height) and every
object's name, bndbox and its 'difficult' / 'truncated' flags. Every object is kept (LOST's
CorLoc uses all ground-truth boxes, difficult and truncated ones included); the flags are read so
that a caller can filter.

Box conventions. VOC boxes are 1-based inclusive pixel indices: (xmin=1, xmax=W) covers the
whole width. The continuous convention used for IoU is 0-based with exclusive ends, a box of area
(x1 - x0) * (y1 - y0): VOC (xmin, ymin, xmax, ymax) is (xmin - 1, ymin - 1, xmax, ymax) there,
exactly as LOST converts the ground truth. For integer boxes this IoU equals the IoU of the sets
of pixels the two VOC boxes cover.
"""
from __future__ import annotations

import dataclasses
import os
from xml.etree import ElementTree

import numpy as np


class VocError(ValueError):
  """A VOC folder or annotation that cannot be read; the message is one line."""


@dataclasses.dataclass(frozen=True)
class VocImage:
  """One annotated image. Boxes (M, 4) float64 [xmin, ymin, xmax, ymax], VOC convention."""
  image_id: str
  image_path: str
  width: int
  height: int
  boxes: np.ndarray
  names: tuple[str, ...]
  difficult: tuple[bool, ...]
  truncated: tuple[bool, ...]


def voc_to_continuous(boxes: np.ndarray) -> np.ndarray:
  """(..., 4) VOC boxes (1-based inclusive) -> continuous [x0, y0, x1, y1) (0-based, float64)."""
  boxes = np.asarray(boxes, np.float64)
  return boxes - np.array([1.0, 1.0, 0.0, 0.0])


def continuous_to_voc(boxes: np.ndarray) -> np.ndarray:
  """(..., 4) continuous boxes [x0, y0, x1, y1) -> VOC's 1-based inclusive convention."""
  boxes = np.asarray(boxes, np.float64)
  return boxes + np.array([1.0, 1.0, 0.0, 0.0])


def _text(element: ElementTree.Element, tag: str, path: str) -> str:
  found = element.find(tag)
  if found is None or found.text is None or not found.text.strip():
    raise VocError(f"annotation {path} has no <{tag}>.")
  return found.text.strip()


def _number(element: ElementTree.Element, tag: str, path: str) -> float:
  text = _text(element, tag, path)
  try:
    return float(text)  # A few VOC2012 boxes have fractional coordinates.
  except ValueError:
    raise VocError(f"annotation {path}: <{tag}> is {text!r}, not a number.") from None


def _flag(element: ElementTree.Element, tag: str) -> bool:
  found = element.find(tag)
  return found is not None and (found.text or "").strip() == "1"


def parse_annotation(path: str, image_path: str = "") -> VocImage:
  """Reads one VOC annotation XML (every object kept; see the module docstring)."""
  try:
    root = ElementTree.parse(path).getroot()
  except (OSError, ElementTree.ParseError) as e:
    raise VocError(f"cannot read annotation {path}: {e}") from None
  size = root.find("size")
  if size is None:
    raise VocError(f"annotation {path} has no <size>.")
  width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
  if width < 1 or height < 1:
    raise VocError(f"annotation {path} gives an image size of {width}x{height}.")
  boxes, names, difficult, truncated = [], [], [], []
  for obj in root.findall("object"):
    bndbox = obj.find("bndbox")
    if bndbox is None:
      raise VocError(f"annotation {path} has an <object> without <bndbox>.")
    boxes.append([_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")])
    names.append(_text(obj, "name", path))
    difficult.append(_flag(obj, "difficult"))
    truncated.append(_flag(obj, "truncated"))
  image_id = os.path.splitext(os.path.basename(path))[0]
  return VocImage(image_id, image_path, width, height, np.asarray(boxes, np.float64).reshape(-1, 4),
                  tuple(names), tuple(difficult), tuple(truncated))


def list_images(root: str, split: str = "trainval") -> list[VocImage]:
  """The annotated images of ROOT/ImageSets/Main/{split}.txt, in the list's order.

  Raises:
    VocError: a missing folder or split file, an id without image or annotation.
  """
  if not os.path.isdir(root):
    raise VocError(f"VOC folder {root} does not exist.")
  for sub in ("JPEGImages", "Annotations"):
    if not os.path.isdir(os.path.join(root, sub)):
      raise VocError(f"{os.path.join(root, sub)} does not exist: expected the PASCAL VOC layout "
                     "(JPEGImages/ID.jpg, Annotations/ID.xml, ImageSets/Main/SPLIT.txt).")
  list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
  if not os.path.isfile(list_file):
    raise VocError(f"split file {list_file} does not exist: check --split (VOC has train, val, "
                   "trainval, and test for VOC2007).")
  with open(list_file) as f:
    # Lines are 'ID' (or 'ID LABEL' in the per-class lists): the first field is the id.
    image_ids = [line.split()[0] for line in f if line.strip()]
  if not image_ids:
    raise VocError(f"split file {list_file} lists no images.")
  images = []
  for image_id in image_ids:
    xml = os.path.join(root, "Annotations", f"{image_id}.xml")
    jpeg = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    if not os.path.isfile(xml):
      raise VocError(f"image {image_id!r} of {list_file} has no annotation {xml}.")
    if not os.path.isfile(jpeg):
      raise VocError(f"image {image_id!r} of {list_file} has no image file {jpeg}.")
    images.append(parse_annotation(xml, jpeg))
  return images
