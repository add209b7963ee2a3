"""Label propagation between video frames by patch affinity (DINO's eval_video_segmentation.py).

The labels of frame t come from frame 0 (its ground truth) and a queue of the n_last_frames
previous frames (their propagated soft labels): each target patch weighs the source patches
within a square window of `radius` patches by exp(cosine / temperature), keeps the topk largest
over all source frames, normalises them to sum one and averages the sources' labels with them.

`propagate` computes only the affinities inside the window: the target grid is cut into
tile x tile blocks, and each block is compared with the (tile + 2 radius)^2 source patches that
any of its targets may see (a matrix product per block); the window of each target is then a
fixed mask on that block. The work grows with N (tile + 2 radius)^2 instead of N^2, and as the
blocks run one after another a frame holds one block's S tile^2 (tile + 2 radius)^2 affinities
at a time instead of S N^2 (S = 1 + n_last_frames source frames). `propagate_dense` compares
every pair of patches and masks the result: the reference of the tests and the benchmark, and
the path when the window holds every patch. `soft_labels_to_pixels` turns the soft labels into a
label map as DINO does.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

WINDOW_TILE = 6  # Target patches per side of a block: the fastest of 4, 6, 8, 12 in BENCHMARKS.md.


def neighborhood_mask(grid: tuple[int, int], radius: int) -> np.ndarray:
  """(N, N) bool: source patch s may label target patch t (both rows and columns within radius)."""
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  if radius <= 0:
    return np.ones((rows.size, rows.size), bool)
  return ((np.abs(rows[:, None] - rows[None, :]) <= radius)
          & (np.abs(cols[:, None] - cols[None, :]) <= radius))


def _normalize(features: jax.Array) -> jax.Array:
  return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def _top_k_average(affinity: jax.Array, labels: jax.Array, topk: int) -> jax.Array:
  """(M, K) affinities (0 where a source may not be used), (K, C) labels -> (M, C) labels."""
  # The k-th largest as the min of the top k: slicing column k-1 instead lets XLA's CPU backend
  # fuse the slice into the select below and sort whole rows (~50x slower at DAVIS sizes).
  kth = jnp.min(jax.lax.top_k(affinity, min(topk, affinity.shape[-1]))[0], axis=1, keepdims=True)
  affinity = jnp.where(affinity >= kth, affinity, 0.0)  # Ties at the k-th value stay, as DINO.
  affinity = affinity / jnp.sum(affinity, axis=1, keepdims=True)
  return affinity @ labels


def _scan_queue(label_frame: Callable, features: jax.Array, first_labels: jax.Array,
                n_last_frames: int) -> jax.Array:
  """Frames 1..T-1 labelled in turn from frame 0 and a ring buffer of the previous frames.

  Args:
    label_frame: (sources (S, *P, D), labels (S, *P, C), valid (S,) bool, target (*P, D)) ->
      the target's labels (*P, C); S = 1 + n_last_frames, P the layout of a frame's patches.
    features: (T, *P, D); first_labels: (*P, C).

  Returns:
    (T-1, *P, C): frame t's labels (the queue holds these soft labels, as DINO's does).
  """

  def step(queue, target):
    queue_features, queue_labels, queue_valid, count = queue
    sources = jnp.concatenate([features[:1], queue_features])
    labels = jnp.concatenate([first_labels[None], queue_labels])
    valid = jnp.concatenate([jnp.ones((1,), bool), queue_valid])
    new_labels = label_frame(sources, labels, valid, target)
    slot = count % n_last_frames
    queue = (queue_features.at[slot].set(target), queue_labels.at[slot].set(new_labels),
             queue_valid.at[slot].set(True), count + 1)
    return queue, new_labels

  start = (jnp.zeros((n_last_frames,) + features.shape[1:], features.dtype),
           jnp.zeros((n_last_frames,) + first_labels.shape, jnp.float32),
           jnp.zeros((n_last_frames,), bool), jnp.zeros((), jnp.int32))
  return jax.lax.scan(step, start, features[1:])[1]


def _dense(features: jax.Array, first_labels: jax.Array, *, radius: int, grid: tuple[int, int],
           n_last_frames: int, topk: int, temperature: float) -> jax.Array:
  """`propagate` from the (N, S N) affinities of each frame, masked to the window."""
  num_patches = features.shape[1]
  mask = jnp.asarray(neighborhood_mask(grid, radius), jnp.float32)  # Symmetric.

  def label_frame(sources, labels, valid, target):
    affinity = jnp.exp(jnp.einsum("snd,md->msn", sources, target,
                                  precision=jax.lax.Precision.HIGHEST) / temperature)
    # (N_target, S, N_source): empty queue slots and far sources weigh nothing.
    affinity = affinity * mask[:, None, :] * valid[None, :, None]
    return _top_k_average(affinity.reshape(num_patches, -1),
                          labels.reshape(-1, labels.shape[-1]), topk)

  return _scan_queue(label_frame, _normalize(features), first_labels, n_last_frames)


def _windowed(features: jax.Array, first_labels: jax.Array, *, radius: int, grid: tuple[int, int],
              n_last_frames: int, topk: int, temperature: float, tile: int) -> jax.Array:
  """`_dense` with the affinities of each tile x tile block of targets against its window only.

  Frames live on a padded map (Hp, Wp) = (tiles * tile + 2 radius) per side, the grid at offset
  (radius, radius): the block at grid origin (y, x) sees the map's rows y..y + tile + 2 radius - 1
  and columns x..x + tile + 2 radius - 1, and target (i, j) of the block the cells (a, b) of that
  window with |a - i - radius| <= radius and |b - j - radius| <= radius.
  """
  (height, width), r, t = grid, radius, tile
  tiles = (-(-height // t), -(-width // t))
  padded = (tiles[0] * t + 2 * r, tiles[1] * t + 2 * r)
  side = t + 2 * r  # Of a block's window.
  inside = np.zeros(padded, bool)
  inside[r:r + height, r:r + width] = True
  i, j = np.divmod(np.arange(t * t), t)
  a, b = np.divmod(np.arange(side * side), side)
  near = ((np.abs(a[None] - i[:, None] - r) <= r)
          & (np.abs(b[None] - j[:, None] - r) <= r))  # (t^2, side^2)
  origins = np.stack(np.meshgrid(np.arange(tiles[0]) * t, np.arange(tiles[1]) * t,
                                 indexing="ij"), -1).reshape(-1, 2).astype(np.int32)

  def to_map(x):  # (..., N, X) -> (..., Hp, Wp, X), zero outside the grid.
    x = x.reshape(x.shape[:-2] + (height, width, x.shape[-1]))
    pads = [(0, 0)] * (x.ndim - 3) + [(r, padded[0] - height - r), (r, padded[1] - width - r),
                                      (0, 0)]
    return jnp.pad(x, pads)

  def label_frame(sources, labels, valid, target):
    num_sources, dim, num_classes = sources.shape[0], sources.shape[-1], labels.shape[-1]
    usable = jnp.asarray(inside)[None] & valid[:, None, None]  # (S, Hp, Wp)

    def block(origin):
      y, x = origin[0], origin[1]
      window = jax.lax.dynamic_slice(sources, (0, y, x, 0), (num_sources, side, side, dim))
      window_labels = jax.lax.dynamic_slice(labels, (0, y, x, 0),
                                            (num_sources, side, side, num_classes))
      window_usable = jax.lax.dynamic_slice(usable, (0, y, x), (num_sources, side, side))
      queries = jax.lax.dynamic_slice(target, (y + r, x + r, 0), (t, t, dim))
      # (t^2, S side^2): one matrix product, in the layout the top-k reads.
      affinity = jnp.exp(jnp.dot(queries.reshape(t * t, dim), window.reshape(-1, dim).T,
                                 precision=jax.lax.Precision.HIGHEST) / temperature)
      weigh = near[:, None, :] & window_usable.reshape(num_sources, -1)[None]
      return _top_k_average(affinity * weigh.reshape(t * t, -1),
                            window_labels.reshape(-1, num_classes), topk)

    blocks = jax.lax.map(block, jnp.asarray(origins))  # (tiles, t^2, C)
    out = blocks.reshape(tiles + (t, t, num_classes)).transpose(0, 2, 1, 3, 4)
    out = jnp.pad(out.reshape(tiles[0] * t, tiles[1] * t, num_classes), ((r, r), (r, r), (0, 0)))
    # Padding targets (whose weights may be 0 / 0) must not become sources.
    return jnp.where(inside[..., None], out, 0.0)

  soft = _scan_queue(label_frame, to_map(_normalize(features)), to_map(first_labels),
                     n_last_frames)
  return soft[:, r:r + height, r:r + width].reshape(soft.shape[0], height * width, -1)


_STATIC = ("grid", "radius", "n_last_frames", "topk")


@functools.partial(jax.jit, static_argnames=_STATIC + ("tile",))
def propagate(features: jax.Array, first_labels: jax.Array, *, grid: tuple[int, int],
              radius: int, n_last_frames: int, topk: int, temperature: float,
              tile: int = WINDOW_TILE) -> jax.Array:
  """Soft labels of frames 1..T-1 propagated from frame 0 and a queue of previous frames.

  Args:
    features: (T, N, D) patch tokens of every frame, N = grid[0] * grid[1] row-major
      (normalised here).
    first_labels: (N, C) one-hot labels of frame 0 at patch resolution.
    grid: the patch grid (rows, columns).
    radius: sources within this many patches of the target in rows and columns; 0 (or a window
      that covers the grid): every patch.
    n_last_frames: previous frames in the queue.
    topk: source patches kept per target patch (over all source frames).
    temperature: affinity exp(cosine / temperature).
    tile: target patches per side of a block (see the module docstring); any value gives the
      same labels.

  Returns:
    (T-1, N, C) float32: frame t's labels, each target patch a convex combination of source
    labels (the queue holds these, not their arg-max, as DINO does).
  """
  if features.shape[1] != grid[0] * grid[1]:
    raise ValueError(f"features have {features.shape[1]} patches, grid {grid} has "
                     f"{grid[0] * grid[1]}.")
  settings = dict(radius=radius, grid=grid, n_last_frames=n_last_frames, topk=topk,
                  temperature=temperature)
  if radius <= 0 or radius >= max(grid) - 1:  # The window holds every patch.
    return _dense(features, first_labels, **dict(settings, radius=0))
  return _windowed(features, first_labels, tile=tile, **settings)


@functools.partial(jax.jit, static_argnames=_STATIC)
def propagate_dense(features: jax.Array, first_labels: jax.Array, *, grid: tuple[int, int],
                    radius: int, n_last_frames: int, topk: int, temperature: float) -> jax.Array:
  """`propagate` through the (N, N) affinities of every pair of patches, masked to the window:
  the reference that `propagate` must equal (tests, benchmarks/davis_propagation.py)."""
  return _dense(features, first_labels, radius=radius, grid=grid, n_last_frames=n_last_frames,
                topk=topk, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("grid", "patch_size"))
def soft_labels_to_pixels(soft: jax.Array, *, grid: tuple[int, int],
                          patch_size: int) -> jax.Array:
  """(T, N, C) soft labels -> (T, gh * p, gw * p) uint8 labels: bilinear upsampling (half-pixel
  centres, as F.interpolate(align_corners=False)), each channel rescaled to [0, 1], arg-max."""

  def one(frame):
    maps = frame.T.reshape((-1,) + grid)  # (C, gh, gw)
    maps = jax.image.resize(maps, (maps.shape[0], grid[0] * patch_size, grid[1] * patch_size),
                            "bilinear")
    low = jnp.min(maps, axis=(1, 2), keepdims=True)
    high = jnp.max(maps, axis=(1, 2), keepdims=True)
    shifted = maps - low
    span = high - low
    rescaled = jnp.where(span > 0, shifted / jnp.where(span > 0, span, 1.0), shifted)
    maps = jnp.where(high > 0, rescaled, maps)  # DINO rescales only channels with a positive max.
    return jnp.argmax(maps, axis=0).astype(jnp.uint8)

  return jax.lax.map(one, soft)
