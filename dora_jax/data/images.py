"""Labelled images (an image folder, a tfds dataset) and DINO's evaluation view of one image.

The one owner of both for k-NN (`dora_jax.evaluation`) and dora-finetune (`dora_jax.finetune`):
it lives in the data layer, below both, because it must not import jax (dora-finetune reads it
in grain's worker processes).

  open_source("/data/imagenet/val")                 one subfolder per class (torchvision's
                                                    ImageFolder: classes sorted by name, images
                                                    of its extensions found under them)
  open_source("tfds:imagenette/160px:validation")   tfds.data_source (array_record files; no
                                                    TensorFlow), split slices such as
                                                    "train[:2000]" included

A source is a random-access sequence: `len(source)`, `source[i]` -> {"image": uint8 RGB
(H, W, 3), "label": int}, with `class_names`, `num_classes` and `name`. Bad input raises
`SourceError` (a ValueError) with a one-line message.

`eval_view` is DINO's evaluation transform without the normalisation (eval_knn.py,
eval_linear.py): the shorter side resized to 256 (bicubic through PIL, the longer side
int(256 * long / short) as torchvision's Resize), then the central 224 x 224 (torchvision's
CenterCrop offsets round((side - 224) / 2)).
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
from PIL import Image

# torchvision's ImageFolder extensions (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TFDS_PREFIX = "tfds:"


class SourceError(ValueError):
  """An image source that cannot be read; the message is one line and names the path or name."""


class ImageSource(Protocol):
  name: str
  class_names: tuple[str, ...]
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


def to_rgb(array: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8."""
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


class ImageFolder:
  """ROOT/CLASS/IMAGE files; labels are the indices of the sorted class folder names."""

  def __init__(self, root: str):
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise SourceError(f"image folder {root} does not exist (expected ROOT/CLASS/IMAGE files, "
                        f"or tfds:NAME:SPLIT).")
    self.name = root
    self.class_names = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
    if not self.class_names:
      raise SourceError(f"image folder {root} has no class subfolders (expected "
                        "ROOT/CLASS/IMAGE files).")
    self.num_classes = len(self.class_names)
    self.samples: list[tuple[str, int]] = []
    for label, class_name in enumerate(self.class_names):
      folder = os.path.join(root, class_name)
      files = sorted(
          os.path.join(dirpath, filename)
          for dirpath, _, filenames in os.walk(folder, followlinks=True)
          for filename in filenames if filename.lower().endswith(IMAGE_EXTENSIONS))
      if not files:
        raise SourceError(f"class folder {folder} has no images (extensions "
                          f"{' '.join(IMAGE_EXTENSIONS)}); remove it or add images.")
      self.samples.extend((path, label) for path in files)

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.samples[index]
    try:
      with Image.open(path) as image:
        return {"image": np.asarray(image.convert("RGB")), "label": label}
    except (OSError, ValueError) as e:
      raise SourceError(f"cannot read image {path}: {e}") from None

  def __repr__(self) -> str:
    return f"ImageFolder({self.name!r}, {len(self)} images, {self.num_classes} classes)"


class TfdsSource:
  """A tfds split read through `tfds.data_source` (random access, no TensorFlow)."""

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str | None = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.name = f"{TFDS_PREFIX}{name}:{split}"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except tfds.core.registered.DatasetNotFoundError:
      raise SourceError(f"{self.name}: tfds has no dataset {name!r} (see `tfds.list_builders()`)"
                        ) from None
    except Exception as e:  # pylint: disable=broad-except
      # tfds says e.g. that the dataset is not prepared, or prepared as TFRecord only.
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise SourceError(
          f"{self.name} cannot be read from data_dir {data_dir or '(tfds default)'}: "
          f"{first_line} (prepare it with `tfds build {name} --file_format=array_record`).") \
          from None
    features = self._source.dataset_info.features
    for key in (image_key, label_key) if label_key else (image_key,):
      if key not in features:
        raise SourceError(f"{self.name} has no feature {key!r} (it has {sorted(features)}).")
    # Without a label key (pretraining reads images only) there are no classes; labels are -1.
    self.class_names = tuple(features[label_key].names) if label_key else ()
    self.num_classes = len(self.class_names)
    self._image_key, self._label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    label = int(example[self._label_key]) if self._label_key else -1
    return {"image": to_rgb(example[self._image_key]), "label": label}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} images, {self.num_classes} classes)"


def open_source(spec: str, *, tfds_data_dir: str | None = None,
                label_key: str | None = "label") -> ImageFolder | TfdsSource:
  """`tfds:NAME:SPLIT` (NAME up to the first ':'; SPLIT may be a slice) or an image folder.

  `label_key` None reads a tfds split's images without labels (label -1).
  """
  if not spec:
    raise SourceError("the image source is empty: give an image folder or tfds:NAME:SPLIT.")
  if spec.startswith(TFDS_PREFIX):
    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    if not name or not split:
      raise SourceError(f"{spec!r}: expected tfds:NAME:SPLIT, e.g. tfds:imagenette/160px:train.")
    return TfdsSource(name, split, data_dir=tfds_data_dir, label_key=label_key)
  return ImageFolder(spec)


# ---- DINO's evaluation view. ----


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) after resizing the shorter side to `size`: the longer side becomes
  int(size * long / short), as torchvision's Resize(size)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_shorter_side(image: np.ndarray, size: int,
                        resample: int = Image.BICUBIC) -> np.ndarray:
  """(H, W, 3) uint8 -> shorter side `size`, the longer int(size * long / short) (torchvision)."""
  height, width = image.shape[:2]
  new_h, new_w = shorter_side_size(height, width, size)
  if (new_h, new_w) == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size window of an (H, W, ...) image at least that large (torchvision)."""
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f"cannot centre-crop {size} px from an image of {height}x{width}.")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image[top:top + size, left:left + size]


def eval_view(image: np.ndarray, *, resize_size: int = 256, crop_size: int = 224) -> np.ndarray:
  """DINO's evaluation transform without the normalisation: uint8 (crop_size, crop_size, 3)."""
  if resize_size < crop_size:
    raise ValueError(f"resize_size ({resize_size}) must be at least crop_size ({crop_size}).")
  return center_crop(resize_shorter_side(image, resize_size), crop_size)
