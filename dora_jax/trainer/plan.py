"""The plan of a DoRA run: its config's model, DoRA, mesh and evals sections, parsed once at the start.

`preflight.check_config` builds it before anything is written or compiled; the train state, the
step, the pictures, the shardings, the FLOPs and the evaluators take it, and nothing after that
reads `config.model`, `config.dora`, `config.mesh` or `config.evals` again:

  model       `dino.ModelOptions`: the ViT's size and options, the head, the compute dtype.
  dora        `objects.DoraOptions`: objects, Sinkhorn, masks (the pictures track with them in
              the DINO baseline too); `masking` is what the step uses (None for DINO).
  mesh        `sharding.MeshPlan`: the devices on each axis and the FSDP threshold.
  image_size  the global views' side (`data.global_size`): the position-embedding grid.
  evals       `registry.EvalSettings` of each `config.evals.NAME` that is on (type, cadence,
              every setting): what `periodic.PeriodicEvaluator.build` runs.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dora_jax.evaluation import registry
from dora_jax.models import dino
from dora_jax import objects
from dora_jax.trainer import sharding


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """A run's config sections that the numerics read, parsed and checked (see the module doc)."""
  model: dino.ModelOptions
  dora_enabled: bool
  dora: objects.DoraOptions
  mesh: sharding.MeshPlan
  image_size: int
  evals: tuple[registry.EvalSettings, ...] = ()  # config.evals entries that are on.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> TrainPlan:
    """Parses `config.model`, `config.dora`, `config.mesh`, `data.global_size` and `config.evals`.

    Raises:
      ValueError: one line naming the key that is wrong (model keys as `config model: ...`).
    """
    try:
      model = dino.ModelOptions.from_config(config.model)
    except ValueError as e:
      raise ValueError(f"config model: {e}") from None
    return cls(
        model=model, dora_enabled=bool(config.dora.enabled),
        dora=objects.DoraOptions.from_config(config.dora, num_heads=model.size.num_heads),
        mesh=sharding.MeshPlan.from_config(config.mesh),
        image_size=int(config.data.global_size),
        evals=registry.parse_evals(config.get("evals", {})))

  @property
  def masking(self) -> objects.DoraOptions | None:
    """The object views of the train step: the DoRA options, or None for the DINO baseline."""
    return self.dora if self.dora_enabled else None

  def unrolled(self) -> TrainPlan | None:
    """This plan with the blocks unrolled where they are really scanned (more than 2), else None.

    The same step without the loop: XLA's cost analysis counts a loop's body once, so the FLOPs
    of a scanned step come from this twin's lowering (`compilation.compile_step(unrolled=...)`).
    """
    if not self.model.scan or self.model.size.depth <= 2:
      return None
    return dataclasses.replace(self, model=dataclasses.replace(self.model, scan=False))
