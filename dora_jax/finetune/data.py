"""dora-finetune's views and grain pipelines over the sources of `dora_jax.data.images`.

A source (`images.open_source`: an image folder or tfds:NAME:SPLIT) is a random-access
sequence of {"image": uint8 (H, W, 3), "label": int} with `class_names`. The views are DINO's
linear-evaluation ones: training images get a random-resized crop (scale data.crop_scale, aspect
3/4-4/3) and a horizontal flip; validation images are `images.eval_view`, the k-NN's view: the
short side resized to image_size / data.val_crop_fraction (256 for 224), then the central
square. Both are uint8; normalisation happens on the device. Nothing here imports jax.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from dora_jax.data import images as images_lib
from dora_jax.data import pipeline
from dora_jax.data import views as views_lib

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
  """DINO's evaluation view (`images.eval_view`), short side image_size / val_crop_fraction."""
  return images_lib.eval_view(
      image, resize_size=round(config.image_size / config.val_crop_fraction),
      crop_size=config.image_size)


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
