"""The student/teacher network: the ViT backbone and the DINO head, built from `config.model`
parsed once (`ModelOptions`)."""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.models.head import DINOHead
from dora_jax.models.vit import ViTSize
from dora_jax.models.vit import VisionTransformer
from dora_jax.models.vit import remat_policy
from dora_jax.models.vit import resolve_size

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DinoModel(nnx.Module):
  """Backbone + DINO head: the student (and, as an EMA copy, the teacher)."""

  def __init__(self, backbone: VisionTransformer, head: DINOHead):
    self.backbone = backbone
    self.head = head

  def __call__(self, images: jax.Array, *, drop_path_rng: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images (B, H, W, 3) -> head logits (B, out_dim) of the [CLS] token, and the backbone's
    output dict (`cls`, `tokens`, `attn`, `q`, `k`; see `VisionTransformer.__call__`)."""
    out = self.backbone(images, drop_path_rng=drop_path_rng)
    return self.head(out["cls"]), out

  def multi_crop(self, groups: list[jax.Array], drop_path_rngs: list[jax.Array | None]
                 ) -> list[jax.Array]:
    """Head logits for groups of images of different sizes, as DINO's MultiCropWrapper: the
    backbone once per group (one image size each), the head once on all their [CLS] tokens.

    groups: arrays (B_i, H_i, W_i, 3); drop_path_rngs: one key (or None) per group.
    Returns the logits (B_i, out_dim) of each group, the same numbers as `self(group)` per
    group (to float32 rounding); one head call instead of one per group saves a pass over the
    (bottleneck, out_dim) last layer and its gradient.
    """
    if len(groups) != len(drop_path_rngs):
      raise ValueError(f"multi_crop: {len(groups)} groups but {len(drop_path_rngs)} keys.")
    cls = [self.backbone(images, drop_path_rng=rng)["cls"]
           for images, rng in zip(groups, drop_path_rngs)]
    logits = self.head(jnp.concatenate(cls, axis=0))
    return jnp.split(logits, np.cumsum([c.shape[0] for c in cls])[:-1])


def compute_dtype(name: str) -> Any:
  """"float32" / "bfloat16" (config.model.compute_dtype) -> the jnp dtype."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(
        f"config.model.compute_dtype is {name!r}; expected one of {sorted(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[name]


def size_overrides(model_config) -> dict[str, int]:
  """The `dim`/`depth`/`num_heads`/`patch_size` keys of `config.model` that override the variant
  (absent, None or 0 keep the variant's value)."""
  keys = ("dim", "depth", "num_heads", "patch_size")
  return {key: model_config.get(key) for key in keys if model_config.get(key)}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """`config.model` parsed and checked once (dora_jax/config_base.py says what each key is).

  Attributes:
    variant: the ViT variant named in the config ("S/16").
    size: the backbone's size: the variant's, with the config's non-zero overrides.
    compute_dtype: "float32" or "bfloat16" (`COMPUTE_DTYPES`).
    remat: one of `vit.REMAT_POLICIES`.
    scan: ViT blocks 0..depth-2 under one lax.scan.
    The others are the head's and the student's drop path, as in the config.
  """
  variant: str
  size: ViTSize
  drop_path_rate: float
  head_hidden_dim: int
  head_bottleneck_dim: int
  head_layers: int
  out_dim: int
  norm_last_layer: bool
  compute_dtype: str
  remat: str
  scan: bool

  @classmethod
  def from_config(cls, model_config) -> ModelOptions:
    """Parses `config.model` (a saved config without `remat` or `scan` gets "none", False).

    Raises:
      ValueError: an unknown variant or dtype, an inconsistent size, a bad remat (one line).
    """
    compute_dtype(model_config.compute_dtype)
    return cls(
        variant=model_config.variant,
        size=model_size(model_config),
        drop_path_rate=float(model_config.drop_path_rate),
        head_hidden_dim=int(model_config.head_hidden_dim),
        head_bottleneck_dim=int(model_config.head_bottleneck_dim),
        head_layers=int(model_config.head_layers),
        out_dim=int(model_config.out_dim),
        norm_last_layer=bool(model_config.norm_last_layer),
        compute_dtype=model_config.compute_dtype,
        remat=remat_policy(model_config.get("remat", "none")),
        scan=bool(model_config.get("scan", False)))


def model_size(model_config) -> ViTSize:
  """The backbone's size: the variant's, with the non-zero overrides of `config.model`.

  Raises:
    ValueError: an unknown variant or an inconsistent size (one line).
  """
  return resolve_size(model_config.variant, **size_overrides(model_config))


def build_model(options: ModelOptions, *, img_size: int, rngs: nnx.Rngs) -> DinoModel:
  """Builds the `DinoModel` that `options` (`config.model`, parsed) describes."""
  dtype = compute_dtype(options.compute_dtype)
  size = options.size
  backbone = VisionTransformer(
      options.variant, img_size=img_size, drop_path_rate=options.drop_path_rate, dtype=dtype,
      dim=size.dim, depth=size.depth, num_heads=size.num_heads, patch_size=size.patch_size,
      remat=options.remat, scan=options.scan, rngs=rngs)
  head = DINOHead(
      size.dim, options.out_dim, hidden_dim=options.head_hidden_dim,
      bottleneck_dim=options.head_bottleneck_dim, num_layers=options.head_layers,
      norm_last_layer=options.norm_last_layer, dtype=dtype, rngs=rngs)
  return DinoModel(backbone, head)


def split_model(model: DinoModel) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, parameters, constants): the parameters (nnx.Param) are what the student trains
  and the teacher averages; the constants are the model's other variables (may be empty)."""
  return nnx.split(model, nnx.Param, ...)


def abstract_model(options: ModelOptions, *, img_size: int
                   ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """`split_model` of `build_model(options, img_size=...)` as jax.ShapeDtypeStructs: the
  shapes of the student's or teacher's state (e.g. to read a run's teacher), nothing allocated."""
  graphdefs = []

  def init(rng: jax.Array) -> tuple[nnx.State, nnx.State]:
    graphdef, params, constants = split_model(
        build_model(options, img_size=img_size, rngs=nnx.Rngs(params=rng)))
    graphdefs.append(graphdef)
    return params, constants

  params, constants = jax.eval_shape(init, jax.random.PRNGKey(0))
  return graphdefs[0], params, constants


def backbone_of(graphdef: nnx.GraphDef, params: nnx.State, constants: nnx.State
                ) -> VisionTransformer:
  """The ViT of a split `DinoModel` (e.g. the teacher's parameters of a train state)."""
  return nnx.merge(graphdef, params, constants).backbone
