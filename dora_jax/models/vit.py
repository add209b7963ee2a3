"""Vision Transformer (Flax NNX) as in DINO/DoRA, with PyTorch weight import and export.

The layout follows DINO's `vision_transformer.py`: a patch-embedding convolution, a [CLS] token,
learned position embeddings, pre-norm blocks (LayerNorm eps 1e-6, qkv with bias, MLP ratio 4,
exact GELU) and a final LayerNorm. Parameter paths mirror the PyTorch names
(`blocks[i].attn.qkv.kernel` <-> `blocks.i.attn.qkv.weight`), so import and export are a renaming
plus a transpose.

One call returns what DoRA needs from the teacher: the normalised [CLS] and patch tokens and the
last block's attention probabilities, queries and keys.

Shapes: B batch, H x W image, p patch, N = (H / p) * (W / p) patches, D width, h heads,
d = D / h per-head width.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.models import layers
from dora_jax.models import pos_embed as pos_embed_lib
from dora_jax.models import torch_names

# ImageNet statistics, as the public DINO/DoRA weights expect their inputs normalised.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6  # DINO: partial(nn.LayerNorm, eps=1e-6).
MLP_RATIO = 4


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 pixels (..., 3) -> float32 normalised with the ImageNet mean and std."""
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(PIXEL_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def denormalize_images(images: jax.Array) -> jax.Array:
  """The inverse of `normalize_images`, as float32 in [0, 255] (not rounded)."""
  return (images * jnp.asarray(PIXEL_STD, jnp.float32)
          + jnp.asarray(PIXEL_MEAN, jnp.float32)) * 255.0


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """The shape of a ViT: width, number of blocks, heads and patch side."""
  dim: int
  depth: int
  num_heads: int
  patch_size: int


_WIDTHS = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12)}
VARIANTS: dict[str, ViTSize] = {
    f"{name}/{patch}": ViTSize(dim, depth, heads, patch)
    for name, (dim, depth, heads) in _WIDTHS.items()
    for patch in (16, 8)
}


def parse_variant(name: str) -> ViTSize:
  """Returns the size of a named variant such as "S/16" (see `VARIANTS`)."""
  if name not in VARIANTS:
    raise ValueError(
        f"Unknown ViT variant {name!r}; expected one of {sorted(VARIANTS)}.")
  return VARIANTS[name]


def resolve_size(variant: str | None = "S/16", *, dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 patch_size: int | None = None) -> ViTSize:
  """A named variant with optional overrides, or a custom size when `variant` is None.

  Tests and demos build tiny models with e.g. `variant=None, dim=32, depth=2, num_heads=4,
  patch_size=4`.
  """
  overrides = dict(dim=dim, depth=depth, num_heads=num_heads, patch_size=patch_size)
  if variant is None:
    missing = [k for k, v in overrides.items() if v is None]
    if missing:
      raise ValueError(
          f"variant=None needs all of dim, depth, num_heads, patch_size; missing {missing}.")
    size = ViTSize(**overrides)
  else:
    size = dataclasses.replace(
        parse_variant(variant), **{k: v for k, v in overrides.items() if v is not None})
  for key, value in dataclasses.asdict(size).items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"ViT {key} must be a positive integer, got {value!r}.")
  if size.dim % size.num_heads:
    raise ValueError(
        f"ViT dim ({size.dim}) must be divisible by num_heads ({size.num_heads}).")
  return size


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: zeroes whole residual branches per sample, scaling the rest by 1/keep.

  x: (B, ...). No-op when `rng` is None or `rate` is 0 (the teacher, evaluation).
  """
  if rng is None or rate == 0.0:
    return x
  return _keep_branches(x, 1.0 - rate, rng)


def _keep_branches(x: jax.Array, keep: float | jax.Array, rng: jax.Array) -> jax.Array:
  """`drop_path` with the keep probability given, a float or a traced float32 scalar (the same
  numbers: a Python float meets x as float32 too); keep = 1 keeps every branch unscaled."""
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses precision on large-mean activations in float32.
  # Norms run in float32 (dtype=None follows the float32 residual stream).
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def _linear(in_dim: int, out_dim: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_dim, out_dim, dtype=dtype, kernel_init=layers.trunc_normal_init(),
                    bias_init=jax.nn.initializers.zeros, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention returning the attention probabilities and pre-scale q, k."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, dtype, rngs)
    self.proj = _linear(dim, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: (B, N+1, D) -> (B, N+1, D) and {attn (B, h, N+1, N+1), q, k (B, h, N+1, d)}."""
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))  # Each (B, h, N+1, d).
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (dim // self.num_heads) ** -0.5
    # Softmax in float32 even for bfloat16 matmuls: DoRA reads these rows as object maps.
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bhkd->bqhd", attn.astype(v.dtype), v).reshape(batch, tokens, dim)
    return self.proj(out), {"attn": attn, "q": q, "k": k}


class Mlp(nnx.Module):
  """fc1 -> exact GELU (PyTorch nn.GELU's default) -> fc2."""

  def __init__(self, dim: int, hidden_dim: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden_dim, dtype, rngs)
    self.fc2 = _linear(hidden_dim, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, dim: int, num_heads: int, *, drop_path_rate: float, dtype,
               rngs: nnx.Rngs):
    self.drop_path_rate = drop_path_rate
    self.norm1 = _layer_norm(dim, rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, rngs)
    self.mlp = Mlp(dim, MLP_RATIO * dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, drop_path_rng: jax.Array | None,
               keep_prob: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: (B, N+1, D) float32 -> same shape, and the attention outputs of `Attention`.

    keep_prob: the branches' keep probability as a float32 scalar, instead of 1 -
      `drop_path_rate` (blocks under one scan share the code but not the rate).
    """
    attn_rng = mlp_rng = None
    if drop_path_rng is not None:
      attn_rng, mlp_rng = jax.random.split(drop_path_rng)
    drop = lambda y, rng: drop_path(y, self.drop_path_rate, rng)
    if keep_prob is not None:
      drop = lambda y, rng: y if rng is None else _keep_branches(y, keep_prob, rng)
    y, aux = self.attn(self.norm1(x))
    x = x + drop(y, attn_rng).astype(x.dtype)
    y = self.mlp(self.norm2(x))
    x = x + drop(y, mlp_rng).astype(x.dtype)
    return x, aux


# Kept reachable here: the config's comment and the benchmarks name them through the ViT.
REMAT_POLICIES = layers.REMAT_POLICIES
remat_policy = layers.remat_policy


class VisionTransformer(nnx.Module):
  """DINO's ViT. Call it on normalised images (B, H, W, 3); see `__call__` for the outputs.

  Attributes (parameters): `patch_embed` (conv kernel (p, p, 3, D)), `cls_token` (1, 1, D),
  `pos_embed` (1, 1 + (img_size/p)^2, D), `blocks[i]` (`norm1`, `attn.qkv`, `attn.proj`,
  `norm2`, `mlp.fc1`, `mlp.fc2`), `norm`.
  """

  def __init__(self, variant: str | None = "S/16", *, img_size: int = 224,
               drop_path_rate: float = 0.0, dtype: Any = jnp.float32,
               dim: int | None = None, depth: int | None = None,
               num_heads: int | None = None, patch_size: int | None = None,
               remat: str = "none", scan: bool = False, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      variant: a name from `VARIANTS` ("Ti/16", "S/16", "B/16", "Ti/8", "S/8", "B/8"), or None
        for a custom size given entirely by `dim`, `depth`, `num_heads`, `patch_size`.
      img_size: side of the square training images; sets the position-embedding grid.
      drop_path_rate: stochastic depth of the last block; block i uses
        drop_path_rate * i / (depth - 1), as DINO. Only applied when `__call__` gets an rng.
      dtype: compute dtype of the matmuls (float32 or bfloat16); parameters stay float32, and
        the residual stream, norms and softmax stay float32.
      dim, depth, num_heads, patch_size: override the variant's values.
      remat: what the backward pass recomputes of each block instead of keeping it
        (jax.checkpoint; one of `REMAT_POLICIES`): the same numbers. "dots" keeps only the
        weight matmuls' outputs (less memory, a little recompute; on XLA:CPU also faster under
        `scan`), "full" only each block's input (about one more forward of compute). See
        BENCHMARKS.md.
      scan: run blocks 0..depth-2 as one `jax.lax.scan` over their parameters, stacked for the
        call (the parameters keep their per-block paths, so checkpoints and PyTorch names do not
        change): the same numbers, one block body to compile instead of depth - 1.
      rngs: parameter initialisation.
    """
    size = resolve_size(variant, dim=dim, depth=depth, num_heads=num_heads,
                        patch_size=patch_size)
    if img_size % size.patch_size:
      raise ValueError(
          f"img_size ({img_size}) must be divisible by the patch size ({size.patch_size}).")
    if not 0.0 <= drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
    self.size = size
    self.img_size = img_size
    self.dtype = dtype
    self.remat = remat_policy(remat)
    self.scan = scan
    p, d = size.patch_size, size.dim
    fan_in = p * p * 3
    self.patch_embed = nnx.Conv(
        3, d, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=dtype,
        kernel_init=layers.torch_default_init(fan_in), bias_init=layers.torch_default_init(fan_in),
        rngs=rngs)
    num_patches = (img_size // p) ** 2
    self.cls_token = nnx.Param(layers.trunc_normal_init()(rngs.params(), (1, 1, d)))
    self.pos_embed = nnx.Param(layers.trunc_normal_init()(rngs.params(), (1, num_patches + 1, d)))
    rates = np.linspace(0.0, drop_path_rate, size.depth)
    self.blocks = nnx.List([
        Block(d, size.num_heads, drop_path_rate=float(rate), dtype=dtype, rngs=rngs)
        for rate in rates
    ])
    self.norm = _layer_norm(d, rngs)

  def _check_images(self, images: jax.Array) -> None:
    p = self.size.patch_size
    expected = f"(B, H, W, 3) floating point with H and W multiples of the patch size {p}"
    if (images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % p
        or images.shape[2] % p or images.shape[1] == 0 or images.shape[2] == 0):
      raise ValueError(
          f"VisionTransformer: images has shape {tuple(images.shape)}; expected {expected}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
          f"VisionTransformer: images has dtype {images.dtype}; expected {expected} "
          "(normalise uint8 pixels first).")

  def __call__(self, images: jax.Array, *, drop_path_rng: jax.Array | None = None,
               num_last_blocks: int = 0) -> dict[str, jax.Array]:
    """Runs the ViT.

    Args:
      images: (B, H, W, 3) normalised float images; H, W multiples of the patch size. Sizes
        other than `img_size` (local crops, non-square frames) interpolate `pos_embed`.
      drop_path_rng: PRNG key enabling stochastic depth (student); None for a deterministic
        pass (teacher, evaluation).
      num_last_blocks: n > 0 adds `block_cls` and `block_tokens`, the [CLS] and patch tokens
        of the last n blocks (DINO's `get_intermediate_layers`, which the linear evaluation and
        DINOv2's linear segmentation head concatenate).

    Returns:
      A dict of float32 arrays: `cls` (B, D) and `tokens` (B, N, D), both after the final norm;
      from the last block, `attn` (B, h, N+1, N+1) softmax probabilities and `q`, `k`
      (B, h, N+1, d), the per-head queries and keys before the 1/sqrt(d) scaling. With
      `num_last_blocks` n: `block_cls` (B, n, D), the [CLS] output of blocks depth-n .. depth-1,
      each after the final norm (the last one equals `cls`), and `block_tokens` (B, n, N, D),
      their patch tokens likewise (the last one equals `tokens`).
    """
    self._check_images(images)
    if not 0 <= num_last_blocks <= len(self.blocks):
      raise ValueError(f"num_last_blocks={num_last_blocks} must be in [0, {len(self.blocks)}], "
                       "the model's depth.")
    batch, height, width, _ = images.shape
    p = self.size.patch_size
    x = self.patch_embed(images).astype(jnp.float32)  # (B, H/p, W/p, D)
    x = x.reshape(batch, -1, self.size.dim)
    cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, self.size.dim))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + pos_embed_lib.interpolate_pos_embed(self.pos_embed[...], (height // p, width // p))

    block_rngs = [None] * len(self.blocks)
    if drop_path_rng is not None:
      block_rngs = list(jax.random.split(drop_path_rng, len(self.blocks)))
    run_block = lambda block, x, rng: block(x, rng)
    if self.remat != "none":
      run_block = lambda block, x, rng: layers.rematerialised(block, x, rng, policy=self.remat)
    blocks = list(self.blocks)
    # The last block runs on its own: DoRA reads its attention (and the linear probe the [CLS]
    # of the last blocks, which a scan would not return).
    if self.scan and len(blocks) > 2 and num_last_blocks <= 1:
      x = self._scanned_blocks(blocks[:-1], x, block_rngs[:-1])
      blocks, block_rngs = blocks[-1:], block_rngs[-1:]
    aux = {}
    block_outputs = []  # (B, N+1, D) after the final norm, of each of the last n blocks.
    first = len(self.blocks) - len(blocks)  # Blocks before it ran in the scan.
    for index, (block, rng) in enumerate(zip(blocks, block_rngs), start=first):
      x, aux = run_block(block, x, rng)
      if index >= len(self.blocks) - num_last_blocks:
        block_outputs.append(self.norm(x))
    x = self.norm(x)
    out = {
        "cls": x[:, 0],
        "tokens": x[:, 1:],
        "attn": aux["attn"],
        "q": aux["q"].astype(jnp.float32),
        "k": aux["k"].astype(jnp.float32),
    }
    if num_last_blocks:
      stacked = jnp.stack(block_outputs, axis=1)  # (B, n, N+1, D)
      out.update(block_cls=stacked[:, :, 0], block_tokens=stacked[:, :, 1:])
    return out

  def _scanned_blocks(self, blocks: list[Block], x: jax.Array,
                      rngs: list[jax.Array | None]) -> jax.Array:
    """`blocks` applied in turn to x (B, N+1, D) under one lax.scan; rngs: one key per block or
    all None."""
    graphdef, _ = nnx.split(blocks[0])
    states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])
    keep = jnp.asarray(np.array([1.0 - b.drop_path_rate for b in blocks], np.float32))
    keys = None if rngs[0] is None else jnp.stack(rngs)

    def body(x, scanned):
      state, keep_prob, key = scanned
      x, _ = nnx.merge(graphdef, state)(x, key, keep_prob)
      return x, None

    body = layers.checkpointed(body, self.remat)
    x, _ = jax.lax.scan(body, x, (states, keep, keys))
    return x


# ---- PyTorch weights (the name mapping is in torch_names.py). ----


class WeightMismatchError(ValueError):
  """`from_torch_state_dict`: the weights' names or shapes differ from the model's.

  Attributes: `missing` and `unexpected` (sorted names), `mismatched` ("name: expected (..),
  got (..)" strings), for callers that report them their own way.
  """

  def __init__(self, message: str, *, missing: list[str], unexpected: list[str],
               mismatched: list[str]):
    super().__init__(message)
    self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def to_torch_state_dict(model: VisionTransformer) -> dict[str, np.ndarray]:
  """The model's weights under DINO's PyTorch names (float32 numpy arrays, PyTorch layouts)."""
  _, state = nnx.split(model)
  return {
      torch_names.torch_name(path): np.asarray(torch_names.to_torch_layout(path, np.asarray(value)), np.float32)
      for path, value in torch_names.flatten(nnx.to_pure_dict(state)).items()
  }


def from_torch_state_dict(state_dict: Mapping[str, Any], variant: str | None = "S/16",
                          **kwargs) -> VisionTransformer:
  """Builds a `VisionTransformer` from DINO/DoRA PyTorch weights.

  Args:
    state_dict: name -> array (numpy, or anything `np.asarray` takes, e.g. CPU torch tensors),
      e.g. `torch.load(path)['teacher']`. Names may carry `module.` / `backbone.` prefixes;
      `head.*` entries (the DINO head) are skipped and logged.
    variant: as in `VisionTransformer` (None with dim/depth/num_heads/patch_size in kwargs).
    **kwargs: other `VisionTransformer` arguments. When `img_size` is absent it is read from
      the checkpoint's `pos_embed` (e.g. 197 tokens at patch 16 -> 224).

  Raises:
    WeightMismatchError (a ValueError): listing every missing and unexpected name and every
      shape mismatch; nothing is loaded partially.
  """
  weights = torch_names.strip_prefixes(state_dict, torch_names.BACKBONE_PREFIXES)
  head_names = sorted(name for name in weights if name.startswith("head."))
  if head_names:
    logging.info("from_torch_state_dict: ignoring %d DINO head entries: %s",
                 len(head_names), ", ".join(head_names))
  weights = {k: np.asarray(v) for k, v in weights.items() if not k.startswith("head.")}

  if "img_size" not in kwargs and "pos_embed" in weights:
    size = resolve_size(variant, **{k: kwargs[k] for k in
                                    ("dim", "depth", "num_heads", "patch_size") if k in kwargs})
    side = math.isqrt(max(weights["pos_embed"].shape[1] - 1, 0))
    if weights["pos_embed"].ndim == 3 and side * side + 1 == weights["pos_embed"].shape[1]:
      kwargs["img_size"] = side * size.patch_size

  abstract = nnx.eval_shape(lambda: VisionTransformer(variant, rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(abstract)
  expected = {torch_names.torch_name(path): (path, value.shape)
              for path, value in torch_names.flatten(nnx.to_pure_dict(state)).items()}

  missing = sorted(set(expected) - set(weights))
  unexpected = sorted(set(weights) - set(expected))
  mismatched = []
  for name in sorted(set(expected) & set(weights)):
    path, shape = expected[name]
    if weights[name].shape != torch_names.torch_shape(path, shape):
      mismatched.append(f"{name}: expected {torch_names.torch_shape(path, shape)}, got {weights[name].shape}")
  if missing or unexpected or mismatched:
    raise WeightMismatchError(
        f"from_torch_state_dict(variant={variant!r}, {kwargs}): the weights do not match the "
        f"model.\n  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): "
        f"{unexpected}\n  shape mismatches ({len(mismatched)}): {mismatched}\n"
        "Check the variant (and img_size for pos_embed) against the checkpoint.",
        missing=missing, unexpected=unexpected, mismatched=mismatched)

  loaded = {path: jnp.asarray(torch_names.from_torch_layout(path, weights[name]), jnp.float32)
            for name, (path, _) in expected.items()}
  nnx.replace_by_pure_dict(state, torch_names.unflatten(loaded))
  return nnx.merge(graphdef, state)
