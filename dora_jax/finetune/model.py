"""The classifier of dora-finetune (a ViT backbone + a linear head) and its two optimisers.

Features (B, F) of images (B, H, W, 3):
  linear probe   DINO's linear evaluation: the [CLS] of the last n blocks (each after the final
                 norm) concatenated, optionally with the mean patch token of the last block:
                 F = D * (n + avgpool). DINO interleaves the two when avgpool is on (n = 1);
                 here they are concatenated, the same features in another order.
  fine-tuning    the final [CLS] (B, D).
Logits = features @ kernel + bias, the head initialised as DINO's LinearClassifier (weights
N(0, 0.01), bias 0).

Optimisers (`make_optimizer`):
  linear probe   SGD, momentum 0.9, no weight decay, on the head only (the backbone is frozen).
  fine-tuning    AdamW with layer-wise learning-rate decay (BEiT/MAE): the patch embedding,
                 [CLS] and position embeddings are layer 0, block i is layer i + 1, the final
                 norm and the head are layer depth + 1, and layer l's learning rate is scaled by
                 layer_decay ** (depth + 1 - l). Weight decay (scaled the same way, as PyTorch's
                 per-group AdamW does) applies to weight matrices only: not to biases, norms,
                 [CLS] or position embeddings.
Both take the learning rate from a schedule of the step (linear warm-up, then cosine).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from dora_jax.models import vit

HEAD_INIT_STD = 0.01  # DINO's LinearClassifier: weight.normal_(0, 0.01), bias zero.
NO_DECAY_NAMES = ("cls_token", "pos_embed")  # Tokens are not decayed in fine-tuning (timm, MAE).
MODES = ("linear", "full")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The training recipe, parsed once from the config (see finetune/config_base.py)."""
  mode: str  # "linear" or "full".
  num_classes: int
  num_last_blocks: int  # [CLS] of the last n blocks in the features (1 for "full").
  avgpool: bool  # Also the mean patch token ("linear" only).
  peak_lr: float  # base_lr * batch_size / 256.
  min_lr: float
  warmup_steps: int
  total_steps: int
  momentum: float  # SGD ("linear").
  weight_decay: float  # AdamW ("full").
  layer_decay: float  # Layer-wise learning-rate decay ("full").
  label_smoothing: float  # Cross-entropy label smoothing ("full"; DINO's probe uses none).
  drop_path_rate: float  # Stochastic depth of the backbone ("full").


def feature_dim(dim: int, recipe: Recipe) -> int:
  return dim * (recipe.num_last_blocks + int(recipe.avgpool))


def features(backbone: vit.VisionTransformer, images: jax.Array, recipe: Recipe, *,
             drop_path_rng: jax.Array | None = None) -> jax.Array:
  """images (B, H, W, 3) normalised -> features (B, F) (see the module docstring)."""
  out = backbone(images, drop_path_rng=drop_path_rng, num_last_blocks=recipe.num_last_blocks)
  parts = [out["block_cls"].reshape(images.shape[0], -1)]
  if recipe.avgpool:
    parts.append(jnp.mean(out["tokens"], axis=1))
  return jnp.concatenate(parts, axis=-1)


def init_head(rng: jax.Array, feature_size: int, num_classes: int) -> dict[str, jax.Array]:
  """{"kernel" (F, C), "bias" (C,)}."""
  return {"kernel": HEAD_INIT_STD * jax.random.normal(rng, (feature_size, num_classes)),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def apply_head(head: dict[str, jax.Array], feats: jax.Array) -> jax.Array:
  """features (B, F) -> logits (B, C), in float32."""
  return feats.astype(jnp.float32) @ head["kernel"] + head["bias"]


def with_drop_path(backbone: vit.VisionTransformer, drop_path_rate: float,
                   dtype: Any = jnp.float32) -> vit.VisionTransformer:
  """The same weights in a ViT with other stochastic depth and compute dtype."""
  size = backbone.size
  abstract = nnx.eval_shape(lambda: vit.VisionTransformer(
      None, dim=size.dim, depth=size.depth, num_heads=size.num_heads, patch_size=size.patch_size,
      img_size=backbone.img_size, drop_path_rate=drop_path_rate, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(backbone))


def learning_rate(recipe: Recipe) -> optax.Schedule:
  """0 -> peak_lr linearly over warmup_steps, then cosine to min_lr at total_steps."""
  if recipe.warmup_steps == 0:
    return optax.cosine_decay_schedule(recipe.peak_lr, max(recipe.total_steps, 1),
                                       alpha=recipe.min_lr / recipe.peak_lr if recipe.peak_lr
                                       else 0.0)
  return optax.warmup_cosine_decay_schedule(
      0.0, recipe.peak_lr, recipe.warmup_steps, max(recipe.total_steps, recipe.warmup_steps + 1),
      end_value=recipe.min_lr)


def _names(path) -> tuple[str, ...]:
  """A pytree path as plain names: ('backbone', 'blocks', '3', 'attn', 'qkv', 'kernel')."""
  names = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def layer_scale(path, depth: int, layer_decay: float) -> float:
  """The learning-rate factor of the parameter at `path` in {"backbone": ..., "head": ...}."""
  names = _names(path)
  if names[0] == "backbone" and names[1] in ("patch_embed", "cls_token", "pos_embed"):
    layer = 0
  elif names[0] == "backbone" and names[1] == "blocks":
    layer = int(names[2]) + 1
  else:  # The final norm and the head.
    layer = depth + 1
  return layer_decay ** (depth + 1 - layer)


def decays(path, param) -> bool:
  """Weight decay on weight matrices only (not biases, norms, [CLS], position embeddings)."""
  # Anywhere in the path: nnx.State paths end in the Variable's 'value'.
  return param.ndim > 1 and not set(_names(path)) & set(NO_DECAY_NAMES)


def _scale_by_layer(depth: int, layer_decay: float) -> optax.GradientTransformation:
  def scale(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * layer_scale(path, depth, layer_decay), updates)
  return optax.stateless(scale)


def make_optimizer(recipe: Recipe, depth: int) -> optax.GradientTransformation:
  """SGD for the linear probe (on the head), AdamW with layer decay for fine-tuning."""
  schedule = learning_rate(recipe)
  if recipe.mode == "linear":
    return optax.sgd(schedule, momentum=recipe.momentum or None)
  return optax.chain(
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.add_decayed_weights(
          recipe.weight_decay,
          mask=lambda params: jax.tree_util.tree_map_with_path(decays, params)),
      _scale_by_layer(depth, recipe.layer_decay),
      optax.scale_by_learning_rate(schedule),
  )
