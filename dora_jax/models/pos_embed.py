"""Learned position embeddings resized to another patch grid, as DINO's PyTorch code does it."""
import math

import jax
import jax.numpy as jnp
import numpy as np


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's bicubic resize as DINO calls it.

  DINO's `interpolate_pos_encoding` calls F.interpolate(mode='bicubic', align_corners=False,
  scale_factor=(out + 0.1) / in): Keys cubic with A = -0.75, source coordinate
  (dst + 0.5) / scale_factor - 0.5, border indices clamped. jax.image.resize uses A = -0.5 and
  other coordinates, so imported checkpoints would see different position embeddings.
  """
  a = -0.75
  scale = in_size / (out_size + 0.1)
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  weights = np.stack([
      ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
      ((a + 2) * t - (a + 3)) * t * t + 1,
      ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
      ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
  ], axis=1)
  index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), index.ravel()), weights.ravel())
  return matrix


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """Resizes learned position embeddings to a patch grid, as DINO does for other input sizes.

  pos_embed: (1, 1 + G*G, D) for a square G x G training grid; returns (1, 1 + gh*gw, D). The
  [CLS] entry is kept; the patch grid is resized bicubically (PyTorch's kernel, see
  `_bicubic_matrix`). The training grid itself is returned unchanged.
  """
  num_patches = pos_embed.shape[1] - 1
  side = math.isqrt(num_patches)
  if grid_hw == (side, side):
    return pos_embed
  grid = pos_embed[0, 1:].reshape(side, side, -1).astype(jnp.float32)
  rows = jnp.asarray(_bicubic_matrix(side, grid_hw[0]), jnp.float32)
  cols = jnp.asarray(_bicubic_matrix(side, grid_hw[1]), jnp.float32)
  grid = jnp.einsum("oh,pw,hwd->opd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
  patches = grid.reshape(1, grid_hw[0] * grid_hw[1], -1).astype(pos_embed.dtype)
  return jnp.concatenate([pos_embed[:, :1], patches], axis=1)
