"""Evaluators during pretraining (as big_vision runs them): k-NN, tracking IoU and a short
linear segmentation readout every n steps.

The trainer builds one `PeriodicEvaluator` from the config's `eval` section (config_base.py
lists the keys) and, when `due(step)`, calls `run(teacher_backbone, step)` on every process; the
returned metrics (`knn_top1`, `knn_top5`, `track_iou`, `track_iou_last`, `seg_miou`) go to
metrics.jsonl and TensorBoard like the training metrics:

  evaluator = periodic.PeriodicEvaluator.from_config(config, demo_tour=...)
  ...
  if evaluator.due(step, total_steps):
    writer.write_scalars(step, evaluator.run(train_step.teacher_backbone(graphdef, state), step))

The data is meant to be small (a few thousand images, e.g. tfds:imagenette/160px:train[:2000];
2000 crops of 224 px hold 300 MB): the k-NN's preprocessed crops, the tour's clips and the
segmentation folder's decoded images are prepared once, when the evaluator is built, and kept in
memory; each run only re-runs the backbone (and trains the segmentation readout afresh). Every
process runs the evaluators on its own devices (the data is small) and gets the same numbers.
"""
from __future__ import annotations

import dataclasses
import time

from absl import logging
import ml_collections
import numpy as np

from dora_jax.evaluation import features as features_lib
from dora_jax.data import images as images_lib
from dora_jax.evaluation import knn as knn_lib
from dora_jax.evaluation import seg as seg_lib
from dora_jax.evaluation import seg_data
from dora_jax.evaluation import track as track_lib
from dora_jax.models import dino
from dora_jax import objects

DEMO_TOUR = "demo"  # eval.track_data value: the run's own synthetic tour (data.synthetic).


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The `eval` section, parsed once (see `eval` in config_base.py for the meaning of each key)."""
  every_steps: int
  batch_size: int
  knn_train: str
  knn_val: str
  tfds_data_dir: str
  knn_k: int
  knn_temperature: float
  knn_resize_size: int
  knn_crop_size: int
  track_data: str
  track: track_lib.TrackSettings
  seg_data: str
  seg_num_classes: int
  seg: seg_lib.SegSettings

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *,
                  demo_tour: str | None = None) -> "EvalSettings":
    """Reads `config.eval`, and `config.dora` / `config.data` / `config.model` for the tracker.

    Args:
      config: a training config with an `eval` section.
      demo_tour: the run's synthetic tour, used when eval.track_data is "demo".

    Raises:
      ValueError: naming the key, for inconsistent values.
    """
    e = config.eval
    if bool(e.knn_train) != bool(e.knn_val):
      raise ValueError("config keys eval.knn_train and eval.knn_val go together: set both (or "
                       f"neither); got {e.knn_train!r} and {e.knn_val!r}.")
    track_data = e.track_data
    if track_data == DEMO_TOUR:
      if not demo_tour:
        raise ValueError('config key eval.track_data="demo" needs the synthetic tour of '
                         "data.synthetic; set data.synthetic=True or give a tour's path.")
      track_data = demo_tour
    size = dino.model_size(config.model)
    track = track_lib.TrackSettings(
        num_clips=int(e.track_clips),
        frames_per_clip=int(e.track_frames_per_clip or config.data.frames_per_clip),
        frame_stride=int(e.track_frame_stride or config.data.frame_stride),
        short_side=int(e.track_short_side or config.data.global_size),
        size_multiple=size.patch_size,
        dora=objects.DoraOptions.from_config(config.dora, num_heads=size.num_heads),
        seed=int(config.seed))
    seg = seg_lib.SegSettings(
        iterations=int(e.seg_iterations), batch_size=int(e.seg_batch_size),
        image_size=int(e.seg_image_size or config.data.global_size), blocks=int(e.seg_blocks),
        seed=int(config.seed), num_pictures=0)
    if seg.image_size % size.patch_size:
      raise ValueError(f"config key eval.seg_image_size: {seg.image_size} is not a multiple of "
                       f"the patch size {size.patch_size}.")
    for key, value in (("every_steps", e.every_steps), ("batch_size", e.batch_size),
                       ("knn_k", e.knn_k), ("track_clips", e.track_clips),
                       ("seg_iterations", e.seg_iterations),
                       ("seg_batch_size", e.seg_batch_size), ("seg_blocks", e.seg_blocks)):
      if int(value) < (0 if key == "every_steps" else 1):
        raise ValueError(f"config key eval.{key} must be a positive integer; got {value!r}.")
    return cls(every_steps=int(e.every_steps), batch_size=int(e.batch_size),
               knn_train=e.knn_train, knn_val=e.knn_val, tfds_data_dir=e.tfds_data_dir,
               knn_k=int(e.knn_k), knn_temperature=float(e.knn_temperature),
               knn_resize_size=int(e.knn_resize_size), knn_crop_size=int(e.knn_crop_size),
               track_data=track_data, track=track, seg_data=e.seg_data,
               seg_num_classes=int(e.seg_num_classes), seg=seg)


class PeriodicEvaluator:
  """Runs the configured evaluators on a backbone; see the module docstring."""

  def __init__(self, settings: EvalSettings):
    """Reads and prepares the data: missing or unusable data fails here, before training starts.

    Raises:
      images_lib.SourceError, track.TourError, seg_data.SegError: one-line messages for bad
        data.
    """
    self.settings = settings
    self._num_classes = 0
    self._knn_images = None  # ((train images, labels), (val images, labels)), preprocessed.
    if settings.knn_train:
      train, val = (images_lib.open_source(spec, tfds_data_dir=settings.tfds_data_dir or None)
                    for spec in (settings.knn_train, settings.knn_val))
      if train.num_classes != val.num_classes:
        raise images_lib.SourceError(
            f"eval.knn_train {settings.knn_train} has {train.num_classes} classes, "
            f"eval.knn_val {settings.knn_val} {val.num_classes}.")
      self._num_classes = train.num_classes
      self._knn_images = tuple(
          features_lib.load_preprocessed(source, resize_size=settings.knn_resize_size,
                                         crop_size=settings.knn_crop_size)
          for source in (train, val))
    self._clips = None  # (frames (C, T, H, W, 3), masks (C, T, H, W)) of the tracking clips.
    if settings.track_data:
      self._clips = track_lib.make_clips(*track_lib.load_tour(settings.track_data),
                                         settings.track)

    self._seg_sources = None  # (training, validation) decoded images and labels.
    if settings.seg_data:
      self._seg_sources = tuple(
          seg_data.InMemorySource(seg_data.ADE20KFolder(
              settings.seg_data, split, num_classes=settings.seg_num_classes))
          for split in seg_data.SPLITS)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *,
                  demo_tour: str | None = None) -> "PeriodicEvaluator":
    return cls(EvalSettings.from_config(config, demo_tour=demo_tour))

  @property
  def enabled(self) -> bool:
    return self.settings.every_steps > 0 and any(
        data is not None for data in (self._knn_images, self._clips, self._seg_sources))

  def due(self, step: int, total_steps: int) -> bool:
    """Whether to evaluate after `step` updates (every `every_steps`, and the last step)."""
    return self.enabled and (step % self.settings.every_steps == 0 or step == total_steps)

  def run(self, backbone, step: int) -> dict[str, float]:
    """The metrics of `backbone` (the teacher's ViT): knn_top1/knn_top5 (percent), track_iou and
    track_iou_last (the IoU at the clips' last frame), seg_miou (percent), for the evaluators
    configured."""
    start = time.perf_counter()
    metrics = {}
    s = self.settings
    if self._knn_images is not None:
      encoder = features_lib.Encoder(backbone, ("cls",))
      batch_size = encoder.padded_size(s.batch_size)
      (train_features, train_labels), (val_features, val_labels) = [
          features_lib.embed_batches(
              encoder, features_lib.array_batches(images, labels, batch_size),
              total=len(labels), batch_size=batch_size, progress=False)
          for images, labels in self._knn_images]
      top1, top5 = knn_lib.knn_classifier(
          train_features, train_labels, val_features, val_labels, k=s.knn_k,
          temperature=s.knn_temperature, num_classes=self._num_classes)
      metrics.update(knn_top1=top1, knn_top5=top5)
    if self._clips is not None:
      encoder = features_lib.Encoder(backbone, track_lib.BACKBONE_OUTPUTS)
      masks = track_lib.track_objects(encoder, self._clips[0], s.track, batch_size=s.batch_size)
      report = track_lib.tracking_iou(masks, self._clips[1])
      if report["track_iou"] is not None:
        metrics.update(track_iou=report["track_iou"],
                       track_iou_last=report["track_iou_per_offset"][-1])
    if self._seg_sources is not None:
      report = seg_lib.evaluate_seg(backbone, *self._seg_sources, s.seg, progress=False)
      if report["mIoU"] is not None:
        metrics.update(seg_miou=report["mIoU"])
    logging.info("Evaluation at step %d (%.1f s): %s", step, time.perf_counter() - start,
                 {name: round(float(value), 4) for name, value in metrics.items()})
    return {name: float(np.asarray(value)) for name, value in metrics.items()}
