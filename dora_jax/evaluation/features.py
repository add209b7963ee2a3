"""Frozen-backbone features, as DINO evaluates: resize, centre crop, ImageNet normalisation.

`Encoder` runs a backbone (the ViT of `dora_jax.models.vit`, or any function of normalised images
(B, H, W, 3) returning a dict of arrays) on uint8 batches, data parallel over this process's
devices: the batch is split over a one-axis Mesh with a NamedSharding, the parameters are
replicated, and normalisation happens on the device. `extract_features` adds the host side:
images decoded and cropped by a thread pool one batch ahead of the devices, a tqdm bar.

Preprocessing is DINO's evaluation view, `dora_jax.data.images.eval_view` (the shorter side
resized to 256, bicubic; the central 224 x 224; torchvision's rounding), the view of
dora-finetune's validation images too.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Callable, Iterator, Sequence

from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from dora_jax.data import images as images_lib
from dora_jax.models import vit

DATA_AXIS = "data"


def local_mesh() -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over this process's devices."""
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def _to_local(leaf: Any, sharding: jax.sharding.Sharding) -> Any:
  """A parameter (possibly a global array of a multi-host run) replicated on this host's devices."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if leaf.sharding.is_fully_replicated:
      leaf = leaf.addressable_data(0)
    else:  # FSDP-sharded over several hosts: every process must be here (a collective).
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
  return jax.device_put(leaf, sharding)


@functools.partial(jax.jit, static_argnames=("graphdef", "outputs", "num_last_blocks"))
def _module_forward(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array,
                    outputs: tuple[str, ...], num_last_blocks: int) -> dict[str, jax.Array]:
  out = nnx.merge(graphdef, state)(vit.normalize_images(images), num_last_blocks=num_last_blocks)
  return {name: out[name] for name in outputs}


class Encoder:
  """A backbone on uint8 image batches, data parallel over this process's devices.

  Module-level jit keyed by the model's graph: a new Encoder of the same architecture (the
  periodic evaluator builds one per evaluation) reuses the compiled programs.
  """

  def __init__(self, backbone: Callable[..., dict[str, jax.Array]],
               outputs: Sequence[str] = ("cls",), *, num_last_blocks: int = 0):
    """Args: backbone: an nnx module or a jax-traceable function, called on normalised float32
    images (B, H, W, 3) and returning a dict; outputs: the keys of that dict to keep;
    num_last_blocks: passed to the backbone when > 0 (the ViT's `block_cls`/`block_tokens`)."""
    kwargs = {"num_last_blocks": num_last_blocks} if num_last_blocks else {}
    self.mesh = local_mesh()
    self.num_devices = self.mesh.size
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
        DATA_AXIS))
    outputs = tuple(outputs)
    if isinstance(backbone, nnx.Module):
      graphdef, state = nnx.split(backbone)
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      state = jax.tree.map(lambda leaf: _to_local(leaf, replicated), state)
      self._forward = lambda images: _module_forward(graphdef, state, images, outputs,
                                                     num_last_blocks)
    else:

      def forward(images):
        out = backbone(vit.normalize_images(images), **kwargs)
        return {name: out[name] for name in outputs}

      self._forward = jax.jit(forward)

  def padded_size(self, batch: int) -> int:
    """The batch the devices see: `batch` rounded up to a multiple of the device count."""
    return -(-batch // self.num_devices) * self.num_devices

  def __call__(self, images: np.ndarray, *, pad_to: int = 0) -> dict[str, jax.Array]:
    """uint8 (b, H, W, 3) -> the backbone's outputs, first dimension b (asynchronous arrays).

    The batch is zero-padded to max(pad_to, b) rounded up to the device count (a fixed pad_to
    keeps one compiled program for a ragged last batch); the padding is cut off again.
    """
    images = np.asarray(images)
    count = images.shape[0]
    size = self.padded_size(max(count, pad_to))
    if size > count:
      images = np.concatenate([images, np.zeros((size - count,) + images.shape[1:], images.dtype)])
    out = self._forward(jax.device_put(images, self._batch_sharding))
    return {name: value[:count] for name, value in out.items()}


def _worker_count(num_threads: int) -> int:
  return max(1, num_threads or min(8, os.cpu_count() or 1))


def _source_batches(source: images_lib.ImageSource, batch_size: int, transform: Callable,
                    num_threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 images, labels) batches of a source in order; the next batch decodes meanwhile."""

  def load(index: int) -> tuple[np.ndarray, int]:
    element = source[index]
    return transform(element["image"]), element["label"]

  starts = range(0, len(source), batch_size)
  with concurrent.futures.ThreadPoolExecutor(_worker_count(num_threads)) as pool:
    submit = lambda start: [pool.submit(load, i)
                            for i in range(start, min(start + batch_size, len(source)))]
    pending = submit(starts[0]) if starts else []
    for number, _ in enumerate(starts):
      done = [future.result() for future in pending]
      pending = submit(starts[number + 1]) if number + 1 < len(starts) else []
      yield np.stack([image for image, _ in done]), np.asarray([label for _, label in done])


def embed_batches(encoder: Encoder, batches: Iterator[tuple[np.ndarray, np.ndarray]], *,
                  total: int, batch_size: int, output: str = "cls", progress: bool = True,
                  desc: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Runs `encoder` over (images, labels) batches: (features (n, D) float32, labels (n,) int64).

  Batch i+1 is dispatched before batch i's features are fetched, so host and devices overlap.
  """
  features, labels = [], []
  previous = None
  with tqdm.tqdm(total=total, unit="img", desc=desc, disable=not progress,
                 dynamic_ncols=True) as bar:
    for images, batch_labels in batches:
      current = (encoder(images, pad_to=batch_size)[output], len(batch_labels))
      if previous is not None:
        features.append(np.asarray(previous[0], np.float32))
        bar.update(previous[1])
      previous = current
      labels.append(np.asarray(batch_labels, np.int64))
    if previous is not None:
      features.append(np.asarray(previous[0], np.float32))
      bar.update(previous[1])
  if not features:
    return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
  return np.concatenate(features), np.concatenate(labels)


def extract_features(backbone, source: images_lib.ImageSource, *, batch_size: int = 256,
                     resize_size: int = 256, crop_size: int = 224, output: str = "cls",
                     num_threads: int = 0, progress: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Features of every image of `source`, as DINO evaluates (resize, centre crop, normalise).

  Args:
    backbone: an `Encoder`, or a backbone to wrap in one (see `Encoder`).
    source: an `images` source (image folder, tfds).
    batch_size: images per step over all local devices (rounded up to a multiple of them).
    resize_size, crop_size: shorter side after the resize, side of the centre crop (256, 224).
    output: the backbone output to keep ("cls": the [CLS] token after the final norm).
    num_threads: decoding threads (0: min(8, CPUs)).
    progress: show a tqdm bar on stderr.

  Returns:
    features (N, D) float32 and labels (N,) int64, in the source's order.
  """
  if len(source) == 0:
    raise images_lib.SourceError(f"{source.name} has no images.")
  encoder = backbone if isinstance(backbone, Encoder) else Encoder(backbone, (output,))
  batch_size = encoder.padded_size(batch_size)
  transform = functools.partial(images_lib.eval_view, resize_size=resize_size,
                                crop_size=crop_size)
  batches = _source_batches(source, batch_size, transform, num_threads)
  return embed_batches(encoder, batches, total=len(source), batch_size=batch_size, output=output,
                       progress=progress, desc=os.path.basename(source.name.rstrip("/")))


def load_preprocessed(source: images_lib.ImageSource, *, resize_size: int = 256,
                      crop_size: int = 224, num_threads: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
  """All images of a (small) source, preprocessed: uint8 (N, crop, crop, 3) and labels (N,).

  The periodic evaluator keeps these in memory and only re-runs the backbone.
  """
  if len(source) == 0:
    raise images_lib.SourceError(f"{source.name} has no images.")
  transform = functools.partial(images_lib.eval_view, resize_size=resize_size,
                                crop_size=crop_size)
  batches = list(_source_batches(source, 256, transform, num_threads))
  return (np.concatenate([images for images, _ in batches]),
          np.concatenate([labels for _, labels in batches]).astype(np.int64))


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) arrays in batches of `batch_size` (the last one shorter)."""
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size], labels[start:start + batch_size]
