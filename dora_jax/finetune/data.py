"""Labelled images for dora-finetune: sources (an image folder, a tfds dataset) and grain pipelines.

A source is a random-access sequence of {"image": uint8 (H, W, 3), "label": int} with
`class_names`; `open_source(spec)` opens one from a config string:

  /data/imagenet/train       an image folder: one subfolder per class (sorted names are the
                             labels 0..C-1, as torchvision's ImageFolder), images inside
  tfds:imagenette:train      a tfds dataset prepared in array_record format, read with
                             `tfds.data_source` (no TensorFlow), features "image" and "label"

The views are DINO's linear-evaluation ones: training images get a random-resized crop (scale
data.crop_scale, aspect 3/4-4/3) and a horizontal flip; validation images are resized so that
their short side is image_size / data.val_crop_fraction (256 for 224) and centre-cropped. Both
are uint8; normalisation happens on the device. Nothing here imports jax.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from dora_jax.data import pipeline
from dora_jax.data import views as views_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TFDS_PREFIX = "tfds:"


class ImageFolder:
  """`root/CLASS/IMAGE`: every image file under a class subfolder; labels from sorted names."""

  def __init__(self, root: str):
    root = os.path.abspath(root)
    if not os.path.isdir(root):
      raise ValueError(f"image folder {root} does not exist; expected one subfolder per class.")
    self.root = root
    self.class_names = tuple(sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")))
    if not self.class_names:
      raise ValueError(f"image folder {root} has no class subfolders; expected ROOT/CLASS/IMAGE.")
    files, labels = [], []
    for label, name in enumerate(self.class_names):
      found = sorted(
          os.path.join(folder, file)
          for folder, _, names in os.walk(os.path.join(root, name), followlinks=True)
          for file in names if file.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ValueError(f"class folder {os.path.join(root, name)} holds no image "
                         f"({', '.join(IMAGE_EXTENSIONS)}).")
      files += found
      labels += [label] * len(found)
    self._files = tuple(files)
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self._files[index]
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {path}: {e}") from None
    return {"image": pixels, "label": int(self._labels[index])}

  def __repr__(self) -> str:
    return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.class_names)} classes)"


class TfdsSource:
  """A tfds dataset split through `tfds.data_source` (array_record files, random access)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.spec = f"{TFDS_PREFIX}{name}:{split}"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # pylint: disable=broad-except; tfds raises many kinds.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(
          f"cannot open {self.spec} (data_dir {data_dir or 'tfds default'}): {reason}. Prepare it "
          f"in array_record format first (`tfds build {name} --file_format=array_record`)."
      ) from None
    features = self._source.dataset_info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"{self.spec} has features {sorted(features.keys())}; dora-finetune reads "
                       "'image' and 'label'.")
    self.class_names = tuple(features["label"].names)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    image = np.asarray(record["image"])
    if image.ndim == 2 or image.shape[-1] == 1:  # Grayscale datasets (e.g. mnist).
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    return {"image": image, "label": int(record["label"])}

  def __repr__(self) -> str:
    return f"TfdsSource({self.spec!r}, {len(self)} images, {len(self.class_names)} classes)"


def open_source(spec: str, tfds_data_dir: str = "") -> ImageFolder | TfdsSource:
  """An image folder path, or `tfds:NAME:SPLIT` (see the module docstring)."""
  if not spec:
    raise ValueError("the data source is empty: pass an image folder or tfds:NAME:SPLIT.")
  if spec.startswith(TFDS_PREFIX):
    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    if not name or not split:
      raise ValueError(f"data source {spec!r}: expected tfds:NAME:SPLIT, e.g. "
                       "tfds:imagenette:validation.")
    return TfdsSource(name, split, tfds_data_dir)
  return ImageFolder(spec)


# ---- Views. ----


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """How images become square uint8 views (from the config's `data` section)."""
  image_size: int = 224
  crop_scale: tuple[float, float] = (0.08, 1.0)
  flip_prob: float = 0.5
  val_crop_fraction: float = 0.875

  @classmethod
  def from_config(cls, data_config: Any) -> "ViewConfig":
    return cls(image_size=int(data_config.image_size),
               crop_scale=tuple(float(s) for s in data_config.crop_scale),
               flip_prob=float(data_config.flip_prob),
               val_crop_fraction=float(data_config.val_crop_fraction))


class TrainView:
  """grain random map: random-resized crop and flip -> {"image" (S, S, 3) uint8, "label"}."""

  def __init__(self, config: ViewConfig):
    self.config = config

  def __call__(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = Image.fromarray(element["image"])
    left, top, width, height = views_lib.random_resized_box(
        rng, image.width, image.height, self.config.crop_scale)
    size = self.config.image_size
    view = image.resize((size, size), Image.BILINEAR, box=(left, top, left + width, top + height))
    if rng.random() < self.config.flip_prob:
      view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return {"image": np.asarray(view), "label": np.int32(element["label"])}

  def __repr__(self) -> str:
    return f"TrainView({self.config})"


def center_view(image: np.ndarray, config: ViewConfig) -> np.ndarray:
  """Resize (bicubic) to short side image_size / val_crop_fraction, then the central square."""
  picture = Image.fromarray(image)
  short = round(config.image_size / config.val_crop_fraction)
  scale = short / min(picture.width, picture.height)
  picture = picture.resize((max(short, round(picture.width * scale)),
                            max(short, round(picture.height * scale))), Image.BICUBIC)
  size = config.image_size
  left, top = (picture.width - size) // 2, (picture.height - size) // 2
  return np.asarray(picture.crop((left, top, left + size, top + size)))


class EvalView:
  """grain map: the validation view -> {"image" (S, S, 3) uint8, "label", "valid": 1}."""

  def __init__(self, config: ViewConfig):
    self.config = config

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    return {"image": center_view(element["image"], self.config),
            "label": np.int32(element["label"]), "valid": np.int32(1)}

  def __repr__(self) -> str:
    return f"EvalView({self.config})"


# ---- Pipelines. ----


def train_iterator(source: Sequence[dict[str, Any]], config: ViewConfig, *, global_batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1,
                   num_workers: int = 0, num_threads: int = 2):
  """This host's endless batches {"image" (b, S, S, 3) uint8, "label" (b,) int32}.

  b = global_batch_size // process_count. Every epoch is a fresh global shuffle (grain's
  `shuffle().repeat()`); each image's crop comes from the rng grain derives from its position in
  the global stream, so batches do not depend on num_workers. The iterator has
  `get_state() -> dict` and `set_state(dict)` (what the checkpoints keep).
  """
  dataset = (grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat(None)
             .random_map(TrainView(config)))[process_index::process_count]
  batch_size = global_batch_size // process_count
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(num_threads, 2 * batch_size)))
  if num_workers > 0:  # Workers that exit with the trainer, also when it is killed.
    iter_dataset = pipeline.in_worker_processes(
        iter_dataset, grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_dataset.batch(batch_size, drop_remainder=True))


def eval_batches(source: Sequence[dict[str, Any]], config: ViewConfig, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `source`: this host's batches of b = global_batch_size // process_count.

  Image j goes to host j % process_count. Batches have a fixed shape: the last ones are padded
  with `valid` 0, and every host yields the same number of batches (the collective eval step
  needs all of them).
  """
  batch_size = global_batch_size // process_count
  per_host = -(-len(source) // process_count)
  num_batches = -(-per_host // batch_size)
  dataset = grain.MapDataset.source(source)[process_index::process_count].map(EvalView(config))
  iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(num_threads, batch_size))))
  size = config.image_size
  for _ in range(num_batches):
    rows = list(itertools.islice(iterator, batch_size))
    padding = batch_size - len(rows)
    images = [r["image"] for r in rows] + [np.zeros((size, size, 3), np.uint8)] * padding
    yield {
        "image": np.stack(images),
        "label": np.asarray([r["label"] for r in rows] + [0] * padding, np.int32),
        "valid": np.asarray([1] * len(rows) + [0] * padding, np.int32),
    }
