"""The DINO projection head (Flax NNX), with PyTorch weight import and export.

MLP (Linear + exact GELU, the last layer to the bottleneck) -> L2-normalise -> weight-normalised
linear layer without bias to `out_dim` prototypes, as DINO's `DINOHead` (use_bn=False).

The last layer is stored as `last_layer_v` (bottleneck_dim, out_dim) and `last_layer_g`
(out_dim,), so that its effective weight is w[:, j] = g[j] * v[:, j] / ||v[:, j]||. The trainer
finds these two names to freeze the last layer during the first epoch. With
`norm_last_layer=True` there is no `last_layer_g`: the gain is the constant 1 (DINO freezes it).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.models import layers
from dora_jax.models import torch_names

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default.


class DINOHead(nnx.Module):
  """Projects backbone features (B, in_dim) to prototype logits (B, out_dim)."""

  def __init__(self, in_dim: int, out_dim: int = 65536, *, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = False,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """Builds the head.

    Args:
      in_dim: backbone width D.
      out_dim: number of prototypes (65536 in the paper).
      hidden_dim: MLP hidden width.
      bottleneck_dim: width of the L2-normalised bottleneck.
      num_layers: Linear layers in the MLP (>= 1); GELU between them, none after the last.
      norm_last_layer: fix the weight-norm gain at 1 instead of learning it.
      dtype: compute dtype of the matmuls; parameters stay float32, logits are float32.
      rngs: parameter initialisation.
    """
    if num_layers < 1:
      raise ValueError(f"DINOHead num_layers must be >= 1, got {num_layers}.")
    self.norm_last_layer = norm_last_layer
    self.dtype = dtype
    widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
    self.mlp = nnx.List([
        nnx.Linear(w_in, w_out, dtype=dtype, kernel_init=layers.trunc_normal_init(),
                   bias_init=jax.nn.initializers.zeros, rngs=rngs)
        for w_in, w_out in zip(widths[:-1], widths[1:])
    ])
    # DINO builds the last layer after its trunc-normal init pass, so v keeps PyTorch's
    # default Linear init U(+-1/sqrt(fan_in)); its scale sets the effective step size of v.
    bound = 1.0 / math.sqrt(bottleneck_dim)
    self.last_layer_v = nnx.Param(jax.random.uniform(
        rngs.params(), (bottleneck_dim, out_dim), jnp.float32, -bound, bound))
    if not norm_last_layer:
      self.last_layer_g = nnx.Param(jnp.ones((out_dim,), jnp.float32))

  def last_layer_scale(self) -> jax.Array:
    """The per-prototype factor (out_dim,), float32, that turns v into the effective weight:
    g / ||v|| (column norms; torch._weight_norm divides by the plain norm, no epsilon)."""
    v = self.last_layer_v[...]
    # The column sums of v * v as a (1, bottleneck) x (bottleneck, out_dim) matmul: the same sums
    # to float32 rounding, but XLA:CPU runs this reduction over the major axis of the 64 MB v
    # ~3.6x slower as a reduce (108 vs 30 ms forward, 153 vs 60 ms with the gradient; ~7% of
    # the paper-shaped CPU step). HIGHEST keeps float32 on TPUs and GPUs (no bfloat16 / TF32).
    squared_norms = jnp.dot(jnp.ones((1, v.shape[0]), jnp.float32), v * v,
                            precision=jax.lax.Precision.HIGHEST)[0]
    scale = 1.0 / jnp.sqrt(squared_norms)
    if not self.norm_last_layer:
      scale = scale * self.last_layer_g[...]
    return scale

  def last_layer_weight(self) -> jax.Array:
    """The effective last-layer weight (bottleneck_dim, out_dim), float32: g * v / ||v||."""
    return self.last_layer_v[...] * self.last_layer_scale()[None, :]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, in_dim) -> logits (B, out_dim), float32."""
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = jax.nn.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    x = x / jnp.maximum(norm, NORMALIZE_EPS)
    # x (g v / ||v||) computed as (x v) (g / ||v||): the same product, but on XLA:CPU the
    # normalisation fused into the matmul made it ~50x slower (v is 256 x 65536 in the paper).
    logits = jnp.dot(x.astype(self.dtype), self.last_layer_v[...].astype(self.dtype),
                     preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32) * self.last_layer_scale()[None, :]


# ---- PyTorch weights (DINO names, with or without `module.` / `head.` prefixes). ----


def head_from_torch_state_dict(state_dict: Mapping[str, Any], *, norm_last_layer: bool = False,
                               dtype: Any = jnp.float32) -> DINOHead:
  """Builds a `DINOHead` from DINO/DoRA PyTorch head weights; sizes come from the shapes.

  Args:
    state_dict: name -> array, e.g. `torch.load(path)['teacher']`; `module.` / `head.` prefixes
      are removed and `backbone.*` entries skipped.
    norm_last_layer: build the head with the gain fixed at 1; the checkpoint's gain must then
      be all ones (as DINO leaves it when norm_last_layer=True).
    dtype: compute dtype of the built head.

  Raises:
    ValueError: naming missing, unexpected or mis-shaped weights.
  """
  weights = torch_names.strip_prefixes(state_dict, torch_names.HEAD_PREFIXES)
  backbone_names = [name for name in weights if name.startswith("backbone.")]
  if backbone_names:
    logging.info("head_from_torch_state_dict: ignoring %d backbone entries.", len(backbone_names))
  weights = {name: np.asarray(value) for name, value in weights.items()
             if not name.startswith("backbone.")}
  gain_name = next((n for n in torch_names.HEAD_GAIN_NAMES if n in weights), torch_names.HEAD_GAIN_NAMES[0])
  direction_name = next((n for n in torch_names.HEAD_DIRECTION_NAMES if n in weights), torch_names.HEAD_DIRECTION_NAMES[0])
  if "mlp.weight" in weights:
    num_layers = 1
  else:
    num_layers = len([n for n in weights if re.fullmatch(r"mlp\.\d+\.weight", n)])
  linears = torch_names.head_linear_names(max(num_layers, 1))
  expected = {gain_name, direction_name} | {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
  missing = sorted(expected - set(weights))
  unexpected = sorted(set(weights) - expected)
  if missing or unexpected:
    raise ValueError(
        f"head_from_torch_state_dict: the weights are not a DINO head.\n  missing: {missing}\n"
        f"  unexpected: {unexpected}")

  kernels = [weights[f"{n}.weight"] for n in linears]
  v = weights[direction_name]  # (out_dim, bottleneck_dim)
  g = weights[gain_name].reshape(-1)  # (out_dim, 1) in PyTorch.
  widths = [kernels[0].shape[1]] + [k.shape[0] for k in kernels]
  problems = [f"{n}.weight: shape {k.shape} does not chain from width {w}"
              for n, k, w in zip(linears, kernels, widths[:-1]) if k.shape[1] != w]
  problems += [f"{n}.bias: expected ({k.shape[0]},), got {weights[f'{n}.bias'].shape}"
               for n, k in zip(linears, kernels) if weights[f"{n}.bias"].shape != k.shape[:1]]
  if v.ndim != 2 or v.shape[1] != widths[-1]:
    problems.append(f"{direction_name}: expected (out_dim, {widths[-1]}), got {v.shape}")
  elif g.shape != (v.shape[0],):
    problems.append(f"{gain_name}: expected ({v.shape[0]}, 1), got {weights[gain_name].shape}")
  if problems:
    raise ValueError("head_from_torch_state_dict: shape mismatches: " + "; ".join(problems))
  if norm_last_layer and not np.allclose(g, 1.0):
    raise ValueError(
        f"head_from_torch_state_dict: {gain_name} is not all ones, so the checkpoint was trained "
        "with a learned gain; load it with norm_last_layer=False.")

  hidden_dim = widths[1] if num_layers > 1 else 2048
  abstract = nnx.eval_shape(lambda: DINOHead(
      widths[0], v.shape[0], hidden_dim=hidden_dim, bottleneck_dim=widths[-1],
      num_layers=num_layers, norm_last_layer=norm_last_layer, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  values = {
      "mlp": {i: {"kernel": jnp.asarray(k.T, jnp.float32),
                  "bias": jnp.asarray(weights[f"{n}.bias"], jnp.float32)}
              for i, (n, k) in enumerate(zip(linears, kernels))},
      "last_layer_v": jnp.asarray(v.T, jnp.float32),
  }
  if not norm_last_layer:
    values["last_layer_g"] = jnp.asarray(g, jnp.float32)
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def head_to_torch_state_dict(head: DINOHead) -> dict[str, np.ndarray]:
  """The head's weights under DINO's names (no `head.` prefix), PyTorch layouts, float32."""
  out = {}
  for name, layer in zip(torch_names.head_linear_names(len(head.mlp)), head.mlp):
    out[f"{name}.weight"] = np.asarray(layer.kernel[...], np.float32).T
    out[f"{name}.bias"] = np.asarray(layer.bias[...], np.float32)
  v = np.asarray(head.last_layer_v[...], np.float32)
  gain = (np.ones(v.shape[1], np.float32) if head.norm_last_layer
          else np.asarray(head.last_layer_g[...], np.float32))
  out["last_layer.weight_g"] = gain[:, None]
  out["last_layer.weight_v"] = v.T
  return out
