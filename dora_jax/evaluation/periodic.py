"""Evaluations during pretraining (big_vision's evaluators): the `config.evals` registry entries.

`config.evals.NAME` (see `registry`) runs the evaluator of its `type` every `every_steps` train
steps and at the last step (0: never). The trainer builds one `PeriodicEvaluator` from its run plan
(the entries parsed once, `registry.parse_evals`) and, when `due(step, total_steps)`, calls `run(teacher_backbone, step, total_steps)` on every
process; each value of an evaluation's report in its module's SCORES goes to metrics.jsonl and
TensorBoard as NAME/KEY (`knn/top1`, `davis/J&F`, `discover/CorLoc`, `seg/mIoU`, `track/track_iou`):

  evaluator = periodic.PeriodicEvaluator.build(plan.evals, size=..., run=registry.Run(...))
  ...
  if evaluator.due(step, total_steps):
    writer.write_scalars(step, evaluator.run(train_step.teacher_backbone(graphdef, state), step,
                                             total_steps))

The data is meant to be small (a few thousand images, e.g. tfds:imagenette/160px:train[:2000]):
each evaluator reads and checks it when it is built, before training starts, and keeps what it
can in memory (the k-NN's preprocessed crops, the tour's clips, the segmentation images); each run
only re-runs the backbone. Nothing is written: the scores are the output. Every process runs the
evaluators on its own devices and gets the same numbers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from absl import logging
import ml_collections

from dora_jax.evaluation import registry
from dora_jax.models import dino
from dora_jax.models import vit
from dora_jax import objects


@dataclasses.dataclass(frozen=True)
class Scheduled:
  """One entry of `config.evals`, built."""
  name: str  # NAME: the prefix of its metrics.
  type: str  # Its registry TYPE.
  every_steps: int  # > 0.
  evaluator: Any  # The module's `Evaluator`.

  def due(self, step: int, total_steps: int | None) -> bool:
    return step % self.every_steps == 0 or step == total_steps


class PeriodicEvaluator:
  """Runs the configured evaluators on a backbone; see the module docstring."""

  def __init__(self, scheduled: list[Scheduled]):
    self.scheduled = scheduled

  @classmethod
  def build(cls, settings: Sequence[registry.EvalSettings], *, size: vit.ViTSize,
            run: registry.Run) -> "PeriodicEvaluator":
    """Builds the evaluators of `settings` (reading their data) for a backbone of `size`.

    Raises:
      registry.SettingError: a setting that does not fit (one line naming config.evals.NAME.KEY);
        the evaluators' ERRORS (bad data).
    """
    scheduled = []
    for entry in settings:
      evaluator = registry.module(entry.type).Evaluator(
          dict(entry.values), name_of=registry.config_key_namer(entry.name), run=run)
      evaluator.check(size)
      scheduled.append(Scheduled(entry.name, entry.type, entry.every_steps, evaluator))
    return cls(scheduled)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *,
                  demo_tour: str | None = None) -> "PeriodicEvaluator":
    """`build` from a training config's sections, parsed here (the trainer passes its plan's).

    Args:
      config: a training config.
      demo_tour: the run's synthetic tour (data.synthetic), for a track evaluation's data "demo".
    """
    settings = registry.parse_evals(config.get("evals", {}))
    if not settings:
      return cls([])
    size = dino.model_size(config.model)
    return cls.build(settings, size=size, run=registry.Run(
        image_size=int(config.data.global_size), frames_per_clip=int(config.data.frames_per_clip),
        frame_stride=int(config.data.frame_stride),
        dora=objects.DoraOptions.from_config(config.dora, num_heads=size.num_heads),
        seed=int(config.seed), demo_tour=demo_tour))

  @property
  def enabled(self) -> bool:
    return bool(self.scheduled)

  def due(self, step: int, total_steps: int) -> bool:
    """Whether any evaluation runs after `step` updates."""
    return any(entry.due(step, total_steps) for entry in self.scheduled)

  def run(self, backbone, step: int, total_steps: int | None = None) -> dict[str, float]:
    """The scores of `backbone` (the teacher's ViT) as {NAME/KEY: value}, of the evaluations due
    at `step` (all of them at total_steps)."""
    metrics = {}
    for entry in self.scheduled:
      if not entry.due(step, total_steps):
        continue
      start = time.perf_counter()
      report = entry.evaluator.run(backbone)
      scores = registry.scores(entry.type, report)
      logging.info("Evaluation %s at step %d (%.1f s): %s", entry.name, step,
                   time.perf_counter() - start,
                   {key: round(value, 4) for key, value in scores.items()})
      metrics.update({f"{entry.name}/{key}": value for key, value in scores.items()})
    return metrics
