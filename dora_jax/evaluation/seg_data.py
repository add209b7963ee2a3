"""Images with semantic label maps for the linear segmentation readout (`seg`), and their crops.

  open_seg_source("/data/ADEChallengeData2016", "validation")   the ADE20K layout:
      ROOT/images/{training,validation}/NAME.jpg, ROOT/annotations/{...}/NAME.png
  open_seg_source("tfds:NAME:SPLIT", ...)                        tfds.data_source (no
      TensorFlow) with an image and a segmentation-mask feature ('image', 'segmentation_mask')

Labels follow mmseg's `reduce_zero_label`, the ADE20K convention: the file's 0 ("other") becomes
the ignore index 255 and classes 1..C become 0..C-1; `to_dataset_labels` undoes it for the
predictions written back (ADE20K: 1..C). Class names come from ROOT/objectInfo150.txt (ADE20K's,
the first name of each row) or ROOT/class_names.txt (one per line, as `data.eval_sets` writes it).

A source is a sequence: `len(source)`, `source[i]` -> (uint8 RGB image (H, W, 3), uint8 labels
(H, W) in 0..C-1 or 255), with `name`, `num_classes`, `class_names` (or None) and `names[i]` (the
file stem). Bad input raises `SegError` with a one-line message. No jax here: the crops are
numpy/PIL and run in threads beside the devices.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dora_jax.data import images as images_lib


IGNORE_INDEX = 255
ADE20K_CLASSES = 150  # ADEChallengeData2016 (SceneParsing): 150 classes, label 0 "other".
SPLITS = ("training", "validation")
CLASS_NAME_FILES = ("objectInfo150.txt", "class_names.txt")


class SegError(ValueError):
  """A segmentation source that cannot be read; the message is one line and names the path."""


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
  """mmseg's `reduce_zero_label`: 0 -> 255 (ignored), k -> k - 1, 255 stays 255. (H, W) uint8."""
  labels = np.asarray(labels).astype(np.int32)
  labels = np.where(labels == 0, IGNORE_INDEX + 1, labels) - 1  # 0 and 255 both end at 255.
  return np.where(labels >= IGNORE_INDEX - 1, IGNORE_INDEX, labels).astype(np.uint8)


def to_dataset_labels(prediction: np.ndarray) -> np.ndarray:
  """Predicted classes 0..C-1 -> the dataset's own labels 1..C (uint8), as the files store them."""
  return (np.asarray(prediction).astype(np.int32) + 1).astype(np.uint8)


def read_class_names(root: str) -> list[str] | None:
  """The class names of an ADE-layout folder (see the module docstring), or None."""
  for filename in CLASS_NAME_FILES:
    path = os.path.join(root, filename)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      lines = [line.rstrip("\n") for line in f if line.strip()]
    if filename == "objectInfo150.txt":  # "Idx Ratio Train Val Name" rows, tab-separated.
      return [line.split("\t")[-1].split(";")[0].strip() for line in lines[1:]]
    return lines
  return None


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
  valid = labels[labels != IGNORE_INDEX]
  if valid.size and int(valid.max()) >= num_classes:
    raise SegError(f"{where} has label {int(valid.max()) + 1} but the set has {num_classes} "
                   "classes (1..C); pass the right --num-classes.")
  return labels


class ADE20KFolder:
  """ROOT/images/SPLIT/NAME.jpg with ROOT/annotations/SPLIT/NAME.png (the ADE20K layout)."""

  def __init__(self, root: str, split: str, *, num_classes: int = 0):
    """Args: root: the folder; split: "training" or "validation"; num_classes: C (0: the
    number of class names in the folder, else ADE20K's 150)."""
    root = os.fspath(root)
    expected = ("expected ROOT/images/{training,validation}/*.jpg and "
                "ROOT/annotations/{training,validation}/*.png (the ADE20K layout)")
    for sub in ("images", "annotations"):
      if not os.path.isdir(os.path.join(root, sub, split)):
        raise SegError(f"{root} has no {sub}/{split} folder; {expected}.")
    self.name = os.path.join(root, "images", split)
    self.class_names = read_class_names(root)
    self.num_classes = num_classes or (len(self.class_names) if self.class_names
                                       else ADE20K_CLASSES)
    if self.class_names is not None and len(self.class_names) != self.num_classes:
      self.class_names = None  # A subset of classes was asked for; names would not line up.
    images = sorted(entry.name for entry in os.scandir(self.name)
                    if entry.name.lower().endswith(images_lib.IMAGE_EXTENSIONS))
    if not images:
      raise SegError(f"{self.name} has no images; {expected}.")
    self.samples: list[tuple[str, str]] = []
    for filename in images:
      annotation = os.path.join(root, "annotations", split,
                                os.path.splitext(filename)[0] + ".png")
      if not os.path.isfile(annotation):
        raise SegError(f"image {os.path.join(self.name, filename)} has no annotation "
                       f"{annotation}.")
      self.samples.append((os.path.join(self.name, filename), annotation))
    self.names = [os.path.splitext(filename)[0] for filename in images]

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    image_path, label_path = self.samples[index]
    try:
      with Image.open(image_path) as image:
        pixels = np.asarray(image.convert("RGB"))
      with Image.open(label_path) as annotation:
        labels = np.asarray(annotation)
    except OSError as e:
      raise SegError(f"cannot read {image_path} or {label_path}: {e}") from None
    if labels.ndim != 2 or labels.shape != pixels.shape[:2]:
      raise SegError(f"annotation {label_path} has shape {labels.shape}; expected one label "
                     f"per pixel of its image, {pixels.shape[:2]}.")
    return pixels, _check_labels(reduce_zero_label(labels), self.num_classes, label_path)


class ExampleSegSource:
  """Examples (dicts with an image and a mask feature, e.g. a tfds data source) as a source."""

  def __init__(self, examples: Sequence[dict[str, Any]], name: str, *, num_classes: int,
               image_key: str = "image", mask_key: str = "segmentation_mask",
               class_names: list[str] | None = None):
    if num_classes < 1:
      raise SegError(f"{name}: give the number of classes (--num-classes) for a tfds source.")
    self._examples, self.name, self.num_classes = examples, name, num_classes
    self._image_key, self._mask_key = image_key, mask_key
    self.class_names = class_names
    self.names = [f"{index:06d}" for index in range(len(examples))]

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    example = self._examples[index]
    for key in (self._image_key, self._mask_key):
      if key not in example:
        raise SegError(f"{self.name} example {index} has no feature {key!r} (it has "
                       f"{sorted(example)}).")
    pixels = images_lib.to_rgb(example[self._image_key])
    mask = np.asarray(example[self._mask_key])
    labels = reduce_zero_label(mask[..., 0] if mask.ndim == 3 else mask)
    if labels.shape != pixels.shape[:2]:
      raise SegError(f"{self.name} example {index}: mask {labels.shape} and image "
                     f"{pixels.shape[:2]} differ in size.")
    return pixels, _check_labels(labels, self.num_classes, f"{self.name} example {index}")


def open_seg_source(spec: str, split: str, *, num_classes: int = 0,
                    tfds_data_dir: str | None = None,
                    mask_key: str = "segmentation_mask") -> ADE20KFolder | ExampleSegSource:
  """An ADE-layout folder's `split` ("training"/"validation"), or `tfds:NAME:SPLIT` (split
  unused)."""
  if not spec.startswith(images_lib.TFDS_PREFIX):
    if not os.path.isdir(spec):
      raise SegError(f"--data {spec} is not a folder (expected the ADE20K layout: "
                     "ROOT/images/{training,validation}, ROOT/annotations/...).")
    return ADE20KFolder(spec, split, num_classes=num_classes)
  name, _, tfds_split = spec[len(images_lib.TFDS_PREFIX):].partition(":")
  if not name or not tfds_split:
    raise SegError(f"{spec!r}: expected tfds:NAME:SPLIT.")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    examples = tfds.data_source(name, split=tfds_split, data_dir=tfds_data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SegError(f"{spec} cannot be read: {first_line} (prepare it with `tfds build {name} "
                   "--file_format=array_record`).") from None
  return ExampleSegSource(examples, spec, num_classes=num_classes, mask_key=mask_key)


class InMemorySource:
  """Every sample of a (small) source, decoded once and kept: the periodic evaluator's data."""

  def __init__(self, source):
    self.name, self.num_classes = source.name, source.num_classes
    self.class_names, self.names = source.class_names, list(source.names)
    self._samples = [source[index] for index in range(len(source))]

  def __len__(self) -> int:
    return len(self._samples)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    return self._samples[index]


# ---- Crops (mmseg's ADE20K pipeline, without the photometric distortion). ----


def _resize(image: np.ndarray, labels: np.ndarray | None, height: int, width: int):
  """Bilinear pixels, nearest labels (mmseg's Resize)."""
  image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
  if labels is not None:
    labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
  return image, labels


def train_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, *,
               scale_range: tuple[float, float] = (0.5, 2.0)) -> tuple[np.ndarray, np.ndarray]:
  """A training crop: shorter side resized to size * U(scale_range), a random size x size crop
  (padded with 0 / 255 where the image is smaller), a horizontal flip with p 0.5.

  (H, W, 3) uint8, (H, W) uint8 -> (size, size, 3) uint8, (size, size) uint8.
  """
  height, width = labels.shape
  scale = size * rng.uniform(*scale_range) / min(height, width)
  new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
  image, labels = _resize(image, labels, new_h, new_w)
  top = int(rng.integers(0, max(new_h - size, 0) + 1))
  left = int(rng.integers(0, max(new_w - size, 0) + 1))
  image, labels = image[top:top + size, left:left + size], labels[top:top + size, left:left + size]
  out_image = np.zeros((size, size, 3), np.uint8)
  out_labels = np.full((size, size), IGNORE_INDEX, np.uint8)
  out_image[:image.shape[0], :image.shape[1]] = image
  out_labels[:labels.shape[0], :labels.shape[1]] = labels
  if rng.random() < 0.5:
    out_image, out_labels = out_image[:, ::-1], out_labels[:, ::-1]
  return np.ascontiguousarray(out_image), np.ascontiguousarray(out_labels)


def eval_image(image: np.ndarray, size: int) -> np.ndarray:
  """The whole image resized to size x size (the training resolution; the aspect is not kept):
  (H, W, 3) uint8 -> (size, size, 3) uint8."""
  return _resize(image, None, size, size)[0]
