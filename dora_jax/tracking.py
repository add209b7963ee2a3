"""The DoRA kernels: discover objects, refine them with optimal transport, track and mask them.

Pure functions over arrays, independent of the model classes, usable under `jax.jit` and
`jax.vmap`. Randomness comes from explicit PRNG keys. Shapes use

  B  clips in the batch          T  frames per clip (frame 0 is the anchor)
  h  attention heads             k  objects (prototypes), k <= h
  N  patches per frame           d  token width (h * d_head)
  H, W  image size in pixels     gh, gw  patch grid (N = gh * gw)

Pipeline (docs/DESIGN.md steps 3-6):

  prototypes = discover(anchor_attn, anchor_queries, key, num_objects=k)      # (B, k, d)
  refined, plan = refine(prototypes, anchor_tokens, epsilon=0.05, num_iters=3)
  heatmaps = track(refined, frame_keys)                                       # (B, T, k, N)
  masks = object_masks(heatmaps, grid_size=(gh, gw), image_size=(H, W))       # (B, T, k, H, W)
  views, visible = apply_masks(frames, masks, key, mode="remove")             # (B, T, V, H, W, C)

No gradient is meant to flow through these (DoRA wraps them in `jax.lax.stop_gradient`);
`sinkhorn` unrolls its iterations, so it is differentiable if a caller wants that.
"""
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn

MaskMode = Literal["remove", "keep"]
# Named rules of `object_masks` for the cut of a heat map (besides a fixed number).
THRESHOLD_RULES = ("mean", "batch_mean")


def _check_rank(name: str, array: jax.Array, rank: int, layout: str) -> None:
  if array.ndim != rank:
    raise ValueError(
        f"`{name}` must have shape {layout} (rank {rank}); got shape {tuple(array.shape)}.")


def _check_against_prototypes(prototypes: jax.Array, name: str, other: jax.Array,
                              layout: str) -> None:
  """`prototypes` is (B, k, d) and `other` has `layout`, with the same B first and d last."""
  _check_rank("prototypes", prototypes, 3, "(B, k, d)")
  _check_rank(name, other, layout.count(",") + 1, layout)
  if (prototypes.shape[0], prototypes.shape[2]) != (other.shape[0], other.shape[-1]):
    raise ValueError(
        f"`prototypes` (B, k, d) and `{name}` {layout} disagree on B or d: got "
        f"{tuple(prototypes.shape)} and {tuple(other.shape)}.")


def sinkhorn(scores: jax.Array, *, epsilon: float, num_iters: int) -> jax.Array:
  """Entropic OT plan between k prototypes and N patches with uniform marginals (ott-jax).

  Runs exactly `num_iters` Sinkhorn-Knopp iterations, in the public DoRA code's order: each
  iteration scales the prototypes' rows to 1/k, then the patches' columns to 1/N. After any count
  the columns (patches) of the plan therefore sum to exactly 1/N, and the rows (prototypes)
  approach 1/k as iterations grow. The reference starts from exp((S - max S) / epsilon) scaled to
  mass 1; its first row scaling removes that constant, so ott's zero potentials start at the same
  point.

  ott updates the column potential first and the row potential last; the problem is handed to it
  transposed (patches as rows) to get the reference's order.

  Args:
    scores: (..., k, N) similarities; the transport cost is `-scores`. Computed in float32.
    epsilon: entropic regularisation (absolute, not relative to the cost scale).
    num_iters: number of iterations (>= 1).

  Returns:
    plan: (..., k, N) float32, total mass 1.
  """
  if scores.ndim < 2:
    raise ValueError(f"`scores` must have shape (..., k, N); got shape {tuple(scores.shape)}.")
  if int(num_iters) < 1:
    raise ValueError(f"`num_iters` must be >= 1; got {num_iters}.")
  if not float(epsilon) > 0:
    raise ValueError(f"`epsilon` must be > 0; got {epsilon}.")
  solver = ott_sinkhorn.Sinkhorn(
      # A fixed count: with the default inner_iterations=10, a small count would run none.
      min_iterations=int(num_iters),
      max_iterations=int(num_iters),
      inner_iterations=1,
      # Implicit differentiation is unstable in float32 and DoRA needs no gradient here.
      implicit_diff=None,
  )

  def solve_one(one_scores: jax.Array) -> jax.Array:
    # (N, k): rows are patches (marginal 1/N, updated last), columns prototypes (1/k).
    geom = geometry.Geometry(cost_matrix=-one_scores.T, epsilon=float(epsilon))
    return solver(linear_problem.LinearProblem(geom)).matrix.T

  flat = scores.astype(jnp.float32).reshape((-1,) + scores.shape[-2:])
  plan = jax.vmap(solve_one)(flat)
  return plan.reshape(scores.shape)


def _check_num_objects(num_objects: int, num_heads: int) -> None:
  if num_objects > num_heads:
    raise ValueError(
        f"`num_objects` (k={num_objects}) must not exceed the number of attention heads "
        f"({num_heads}): each object is discovered by one head.")


def choose_heads(key: jax.Array, batch_size: int, num_heads: int, num_objects: int, *,
                 per_batch: bool = False) -> jax.Array:
  """k distinct heads, uniformly at random: per clip, or (`per_batch`) one draw shared by every
  clip of the batch, as the public DoRA code draws them. Returns (B, k) int32."""
  _check_num_objects(num_objects, num_heads)
  if per_batch:
    heads = jax.random.permutation(key, num_heads)[:num_objects]
    return jnp.broadcast_to(heads, (batch_size, num_objects))
  keys = jax.random.split(key, batch_size)
  return jax.vmap(lambda k: jax.random.permutation(k, num_heads)[:num_objects])(keys)


def _check_heads(heads: jax.Array, batch_size: int, num_heads: int,
                 num_objects: int) -> jax.Array:
  """`heads` must be (B, k) integers, distinct per clip, in [0, h); values are checked when known.

  Under `jax.jit` the values are traced and only the shape and dtype can be checked.
  """
  _check_num_objects(num_objects, num_heads)
  heads = jnp.asarray(heads)
  if heads.shape != (batch_size, num_objects) or not jnp.issubdtype(heads.dtype, jnp.integer):
    raise ValueError(
        f"`heads` must be an integer array of shape (B, k) = ({batch_size}, {num_objects}); got "
        f"{heads.dtype} {tuple(heads.shape)}.")
  try:
    values = np.asarray(heads)
  except jax.errors.TracerArrayConversionError:
    return heads
  if values.size and (values.min() < 0 or values.max() >= num_heads):
    raise ValueError(
        f"`heads` must index the {num_heads} attention heads (0..{num_heads - 1}); got values "
        f"{values.min()}..{values.max()}.")
  if any(len(set(row.tolist())) != num_objects for row in values):
    raise ValueError(
        f"`heads` must name {num_objects} distinct heads per clip; got {values.tolist()}.")
  return heads


def discover(attn: jax.Array, queries: jax.Array, key: jax.Array | None, *,
             num_objects: int, heads: jax.Array | None = None) -> jax.Array:
  """Object prototypes from the anchor frame: k heads' [CLS] attention pools the queries.

  Args:
    attn: (B, h, N+1, N+1) the last block's attention of the anchor frame (token 0 is [CLS]).
    queries: (B, h, N+1, d_head) that block's per-head queries.
    key: PRNG key choosing the k heads at random (independently per clip); unused when `heads`
      is given (e.g. one draw for the batch, `choose_heads(..., per_batch=True)`).
    num_objects: k <= h.
    heads: optional (B, k) int, the heads to use (distinct per clip, in [0, h)), for
      reproducible use from other code; None picks them from `key` (see `choose_heads`).

  Returns:
    prototypes: (B, k, d), d = h * d_head: row i is sum_n attn[head_i, CLS, n] * q_n, with q_n
      the patch query of all heads concatenated.
  """
  _check_rank("attn", attn, 4, "(B, h, N+1, N+1)")
  _check_rank("queries", queries, 4, "(B, h, N+1, d_head)")
  batch, num_heads, tokens, _ = attn.shape
  if attn.shape[-1] != tokens or queries.shape[:3] != (batch, num_heads, tokens):
    raise ValueError(
        f"`attn` (B, h, N+1, N+1) and `queries` (B, h, N+1, d_head) disagree: got "
        f"{tuple(attn.shape)} and {tuple(queries.shape)}.")
  if heads is None:
    if key is None:
      raise ValueError("`key` is required when `heads` is None (the heads are drawn from it).")
    head_ids = choose_heads(key, batch, num_heads, num_objects)  # (B, k)
  else:
    head_ids = _check_heads(heads, batch, num_heads, num_objects)
  cls_rows = attn[:, :, 0, 1:]  # (B, h, N)
  chosen = jnp.take_along_axis(cls_rows, head_ids[:, :, None], axis=1)  # (B, k, N)
  patch_queries = concat_heads(queries[:, :, 1:])  # (B, N, d)
  return jnp.einsum("bkn,bnd->bkd", chosen, patch_queries, precision=jax.lax.Precision.HIGHEST)


def concat_heads(per_head: jax.Array) -> jax.Array:
  """(..., h, N, d_head) -> (..., N, h * d_head), heads concatenated as in the qkv projection."""
  moved = jnp.moveaxis(per_head, -3, -2)  # (..., N, h, d_head)
  return moved.reshape(moved.shape[:-2] + (-1,))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def refine(prototypes: jax.Array, anchor_tokens: jax.Array, *, epsilon: float,
           num_iters: int) -> tuple[jax.Array, jax.Array]:
  """Disjoint prototypes: Sinkhorn-Knopp between the prototypes and the anchor's patches.

  The cost of assigning prototype i to patch n is -<p_i, z_n> with z_n the L2-normalised patch
  embedding. The plan M* (mass 1, see `sinkhorn`) times N is an assignment A = N M*: each patch's
  weights over the k prototypes sum to one (as in SwAV and the public DoRA code). The refined
  prototypes are P' = A Z_s: prototype i is a weighted sum of anchor patches whose weights sum to
  about N / k (exactly once the rows converge; after 3 iterations a large object keeps more).
  This scale, not a convex combination's, is the public code's: it sets the temperature of
  `track`'s softmax, hence the size of the masks.

  Args:
    prototypes: (B, k, d) from `discover`.
    anchor_tokens: (B, N, d) the anchor frame's patch embeddings (the backbone's `tokens`).
    epsilon: entropic regularisation (paper 0.05).
    num_iters: Sinkhorn iterations (paper 3, public code 30).

  Returns:
    refined: (B, k, d) float32 refined prototypes P' = N * plan @ Z_s.
    plan: (B, k, N) float32 transport plan, total mass 1 per clip, columns exactly 1/N.
  """
  _check_against_prototypes(prototypes, "anchor_tokens", anchor_tokens, "(B, N, d)")
  num_patches = anchor_tokens.shape[1]
  patches = l2_normalize(anchor_tokens.astype(jnp.float32))
  scores = jnp.einsum("bkd,bnd->bkn", prototypes.astype(jnp.float32), patches,
                      precision=jax.lax.Precision.HIGHEST)
  plan = sinkhorn(scores, epsilon=epsilon, num_iters=num_iters)
  assignment = num_patches * plan  # (B, k, N): every column sums to one.
  refined = jnp.einsum("bkn,bnd->bkd", assignment, patches, precision=jax.lax.Precision.HIGHEST)
  return refined, plan


def track(prototypes: jax.Array, frame_keys: jax.Array) -> jax.Array:
  """Heat maps of the objects in every frame: one cross-attention against each frame's keys.

  Args:
    prototypes: (B, k, d) refined prototypes.
    frame_keys: (B, T, N, d) patch keys of every frame, heads concatenated (see `concat_heads`).

  Returns:
    heatmaps: (B, T, k, N) float32; row (t, i) is a softmax over frame t's patches.
  """
  _check_against_prototypes(prototypes, "frame_keys", frame_keys, "(B, T, N, d)")
  width = prototypes.shape[-1]
  logits = jnp.einsum("bkd,btnd->btkn", prototypes.astype(jnp.float32),
                      frame_keys.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(width))
  return jax.nn.softmax(logits, axis=-1)


def object_masks(heatmaps: jax.Array, *, grid_size: tuple[int, int],
                 image_size: tuple[int, int],
                 threshold: str | float = "mean") -> jax.Array:
  """Binary pixel masks of the tracked objects.

  Each heat map row is binarised, reshaped to the patch grid and upsampled to pixels by nearest
  neighbour. The cut (`threshold`):

    "mean" (default): each row above its own mean over the N patches, separately per clip, frame
      and object: clips never influence each other's masks.
    "batch_mean": the public DoRA code's rule. Each row is L2-normalised, and the cut of
      (frame t, object i) is the mean over the whole batch axis and the patches, so the clips
      passed in together couple. Row i of every clip should then come from the same head, as
      in the public code (`choose_heads(..., per_batch=True)`; `objects.track_objects` does
      so). The reference applies it to one GPU's batch; under `jax.jit` over a sharded global
      batch this is the global batch unless called per device (e.g. in `shard_map`). For a
      single clip it equals "mean".
    a float: every value above it.

  Args:
    heatmaps: (..., k, N) from `track`, N = gh * gw; (B, ..., k, N) for "batch_mean".
    grid_size: (gh, gw) the patch grid.
    image_size: (H, W) in pixels, multiples of (gh, gw).
    threshold: "mean", "batch_mean" or a float.

  Returns:
    masks: (..., k, H, W) bool.
  """
  grid_h, grid_w = grid_size
  height, width = image_size
  if heatmaps.ndim < 2 or heatmaps.shape[-1] != grid_h * grid_w:
    raise ValueError(
        f"`heatmaps` must have shape (..., k, N) with N = gh * gw = {grid_h * grid_w}; got "
        f"{tuple(heatmaps.shape)}.")
  if height % grid_h or width % grid_w:
    raise ValueError(
        f"`image_size` {tuple(image_size)} must be a multiple of `grid_size` {tuple(grid_size)}.")
  if isinstance(threshold, str):
    if threshold == "mean":
      cut = jnp.mean(heatmaps, axis=-1, keepdims=True)
    elif threshold == "batch_mean":
      if heatmaps.ndim < 3:
        raise ValueError(
            "`heatmaps` must have shape (B, ..., k, N) for threshold 'batch_mean'; got "
            f"{tuple(heatmaps.shape)}.")
      heatmaps = l2_normalize(heatmaps.astype(jnp.float32))
      cut = jnp.mean(heatmaps, axis=(0, -1), keepdims=True)
    else:
      raise ValueError(
          f"`threshold` must be one of {THRESHOLD_RULES} or a number; got {threshold!r}.")
  else:
    cut = jnp.float32(threshold)
  on_grid = (heatmaps > cut).reshape(heatmaps.shape[:-1] + (grid_h, grid_w))
  on_pixels = jnp.repeat(on_grid, height // grid_h, axis=-2)
  return jnp.repeat(on_pixels, width // grid_w, axis=-1)


def choose_objects(key: jax.Array, batch_size: int, num_objects: int) -> jax.Array:
  """A uniformly random non-empty subset of the k objects per clip. Returns (B, k) bool."""
  codes = jax.random.randint(key, (batch_size,), 1, 2 ** num_objects)  # 0 = empty is excluded.
  bits = jnp.arange(num_objects)
  return (codes[:, None] >> bits[None, :]) & 1 == 1


def apply_masks(frames: jax.Array, masks: jax.Array, key: jax.Array, *,
                mode: MaskMode = "remove") -> tuple[jax.Array, jax.Array]:
  """The student's object-aware views of every frame.

  mode "remove" (DoRA, default): one view per frame with a random non-empty subset of the
    objects (the same subset for all frames of a clip) zeroed out: X_t * (1 - union of masks).
  mode "keep" (the public reference code): k views per frame, view i = X_t * mask_i.

  Args:
    frames: (B, T, H, W, C) images (normalised; zero is the dataset mean colour).
    masks: (B, T, k, H, W) bool from `object_masks`.
    key: PRNG key choosing the removed objects ("remove" only).
    mode: "remove" or "keep".

  Returns:
    views: (B, T, V, H, W, C) with V = 1 ("remove") or k ("keep").
    visible: (B, T, V, H, W) float32, 1 where the view shows the frame.
  """
  _check_rank("frames", frames, 5, "(B, T, H, W, C)")
  _check_rank("masks", masks, 5, "(B, T, k, H, W)")
  batch, frames_per_clip, height, width, _ = frames.shape
  if (masks.shape[:2] + masks.shape[3:]) != (batch, frames_per_clip, height, width):
    raise ValueError(
        f"`masks` must have shape (B, T, k, H, W) = ({batch}, {frames_per_clip}, k, {height}, "
        f"{width}) to match `frames`; got {tuple(masks.shape)}.")
  if mode == "remove":
    chosen = choose_objects(key, batch, masks.shape[2])  # (B, k)
    removed = jnp.any(masks & chosen[:, None, :, None, None], axis=2)  # (B, T, H, W)
    visible = (~removed)[:, :, None].astype(jnp.float32)  # (B, T, 1, H, W)
  elif mode == "keep":
    visible = masks.astype(jnp.float32)  # (B, T, k, H, W)
  else:
    raise ValueError(f"`mode` must be 'remove' or 'keep'; got {mode!r}.")
  views = frames[:, :, None] * visible[..., None].astype(frames.dtype)
  return views, visible
