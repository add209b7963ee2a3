"""Linear segmentation readout on a frozen backbone (DINOv2's linear head), and mIoU as mmseg.

The readout: the patch tokens of the last block (`blocks=4`: of the last four blocks, each after
the final norm, concatenated on the channel axis), BatchNorm, a linear layer per patch to C
classes; the logits (B, h, w, C) upsampled bilinearly (half-pixel centres, PyTorch's
align_corners=False) to the labels' resolution; cross-entropy over the labelled pixels (255
ignored). Training crops: shorter side resized to image_size x U(0.5, 2), a random
image_size^2 crop, a flip (mmseg's ADE20K pipeline, without its photometric distortion and
cat_max_ratio). Evaluation: each whole image resized to image_size x image_size (the training
resolution, aspect not kept: one compiled program for every image), the logits resized back
to the annotation's own size, argmax. The backbone is frozen and runs on every step's crops
through `features.Encoder` (data parallel over this process's devices); the head's step is
jitted on the same sharded batch, its parameters replicated.

mIoU as mmseg: per class, intersection and union summed over the whole validation set (pixels
labelled 255 ignored), IoU = I / U, the mean over classes with a non-empty union; aAcc = correct /
labelled pixels; mAcc = the mean over classes with labelled pixels of their accuracy. Percent.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import tqdm

from dora_jax import checkpoint
from dora_jax.evaluation import davis
from dora_jax.evaluation import features as features_lib
from dora_jax.evaluation import registry
from dora_jax.evaluation import seg_data

METRICS_FILE = "seg_metrics.json"
PRED_DIR, PICTURES_DIR, READOUT_DIR = "pred", "pictures", "readout"

# The evaluator's settings (config.evals.NAME keys, dora-eval seg's flags), as a short readout
# during pretraining (dora-eval seg: `SegSettings`' defaults, DINOv2's recipe).
DEFAULTS = {
    "data": "",  # An ADE20K-layout folder (images/, annotations/)...
    "train": "",  # ...or, instead, tfds:NAME:SPLIT with a 'segmentation_mask'...
    "val": "",  # ...for training and validation.
    "tfds_data_dir": "",  # data_dir of tfds sources ("": tfds's default).
    "num_classes": 0,  # Classes 1..C (0: the folder's class names file, else ADE20K's 150).
    "iterations": 300,  # Readout training steps per evaluation (dora-eval seg: 40000).
    "batch_size": 16,  # Training crops per step (DINOv2: 16).
    "image_size": 0,  # Crop side and evaluation resolution (0: data.global_size; dora-eval: 512).
    "blocks": 1,  # Patch tokens of the last n blocks, concatenated (DINOv2: 1, or 4).
    "lr": 1e-3,  # AdamW's peak learning rate.
    "seed": -1,  # Crops and initialisation (-1: config.seed; dora-eval: 0).
}
REPORT_FILE = METRICS_FILE
SCORES = ("mIoU", "aAcc", "mAcc")
ERRORS = (seg_data.SegError,)
DESCRIPTION = "Linear segmentation readout (DINOv2's linear head): mIoU, aAcc, mAcc."


@dataclasses.dataclass(frozen=True)
class SegSettings:
  """The readout's recipe. Defaults: DINOv2's ADE20K linear head (mmseg config: AdamW, 40k
  iterations, 2 images x 8 GPUs, poly decay after a linear warm-up) and mmseg's ADE20K crops."""
  iterations: int = 40_000  # DINOv2 linear ADE20K: 40k iterations.
  batch_size: int = 16  # DINOv2: 2 crops per GPU x 8 GPUs.
  image_size: int = 512  # mmseg ADE20K: 512 x 512 crops (and our evaluation resolution).
  blocks: int = 1  # Patch tokens of the last n blocks, concatenated (DINOv2: 1 "linear", 4 "+ms").
  # AdamW as DINOv2's head: BatchNorm'd features take one lr for any backbone; no paramwise
  # rule, so the decay reaches every parameter, as mmseg's default.
  lr: float = 1e-3
  weight_decay: float = 1e-4
  warmup_iterations: int = 1500  # Linear from lr * 1e-6, capped at iterations / 10.
  scale_range: tuple[float, float] = (0.5, 2.0)  # mmseg ADE20K's ratio_range.
  seed: int = 0  # The crops, their order and the head's initialisation.
  num_pictures: int = 4  # Validation images drawn as image | truth | prediction.
  num_threads: int = 0  # Crop threads (0: min(8, CPUs)).


# ---- mIoU (numpy). ----


def intersect_and_union(prediction: np.ndarray, labels: np.ndarray, num_classes: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """mmseg's per-image counts: (H, W) predicted and true classes (255 ignored) -> intersection,
  union, predicted area, label area, each (C,) int64, over the labelled pixels only."""
  prediction, labels = np.asarray(prediction).ravel(), np.asarray(labels).ravel()
  labelled = labels != seg_data.IGNORE_INDEX
  prediction, labels = prediction[labelled].astype(np.int64), labels[labelled].astype(np.int64)
  hits = prediction[prediction == labels]
  intersect = np.bincount(hits, minlength=num_classes)[:num_classes]
  area_pred = np.bincount(prediction, minlength=num_classes)[:num_classes]
  area_label = np.bincount(labels, minlength=num_classes)[:num_classes]
  return intersect, area_pred + area_label - intersect, area_pred, area_label


def mean_iou(intersect: np.ndarray, union: np.ndarray, area_label: np.ndarray
             ) -> dict[str, Any]:
  """Metrics from counts summed over a set ((C,) each): {"mIoU", "aAcc", "mAcc" (percent;
  None when undefined), "IoU", "Acc" ((C,) lists, None for classes left out)}."""
  intersect, union, area_label = (np.asarray(a, np.float64) for a in (intersect, union,
                                                                      area_label))
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, intersect / union, np.nan) * 100
    acc = np.where(area_label > 0, intersect / area_label, np.nan) * 100
  mean = lambda values: None if np.all(np.isnan(values)) else float(np.nanmean(values))
  return {"mIoU": mean(iou), "mAcc": mean(acc),
          "aAcc": float(intersect.sum() / area_label.sum() * 100) if area_label.sum() else None,
          "IoU": [None if np.isnan(v) else float(v) for v in iou],
          "Acc": [None if np.isnan(v) else float(v) for v in acc]}


# ---- The readout. ----


class LinearReadout(nnx.Module):
  """BatchNorm, then a linear layer per patch: features (B, h, w, F) -> logits (B, h, w, C)."""

  def __init__(self, num_features: int, num_classes: int, *, rngs: nnx.Rngs):
    # PyTorch's BatchNorm: momentum 0.1 of the new batch (flax counts the old), eps 1e-5.
    self.norm = nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    # mmseg's conv_seg: normal(std 0.01), bias 0.
    self.linear = nnx.Linear(num_features, num_classes,
                             kernel_init=jax.nn.initializers.normal(0.01), rngs=rngs)

  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    return self.linear(self.norm(features, use_running_average=not train))


def patch_features(block_tokens: jax.Array) -> jax.Array:
  """The ViT's `block_tokens` (B, n, N, D) of square images -> (B, h, w, n * D), h = w = sqrt N,
  the n blocks concatenated per patch (DINOv2's resize_concat)."""
  batch, blocks, tokens, dim = block_tokens.shape
  side = int(round(tokens ** 0.5))
  return jnp.moveaxis(block_tokens, 1, 2).reshape(batch, side, side, blocks * dim)


def upsample(logits: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear (half-pixel centres) (..., h, w, C) -> (..., height, width, C)."""
  return jax.image.resize(logits, logits.shape[:-3] + (height, width, logits.shape[-1]),
                          "bilinear")


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The mean over labelled pixels; logits (B, H, W, C), labels (B, H, W) with 255 ignored."""
  labelled = labels != seg_data.IGNORE_INDEX
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(labelled, labels, 0).astype(jnp.int32))
  return jnp.sum(losses * labelled) / jnp.maximum(jnp.sum(labelled), 1)


def make_optimizer(settings: SegSettings) -> optax.GradientTransformation:
  """AdamW with mmseg's linear warm-up (from lr * 1e-6) and poly (power 1) decay to 0."""
  warmup = min(settings.warmup_iterations, settings.iterations // 10)
  schedule = optax.join_schedules(
      [optax.linear_schedule(settings.lr * 1e-6, settings.lr, warmup),
       optax.linear_schedule(settings.lr, 0.0, settings.iterations - warmup)], [warmup])
  return optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=settings.weight_decay)


def _train_step(graphdef, optimizer, params, batch_stats, opt_state, block_tokens, labels):
  def loss_fn(params, batch_stats):
    head = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = head(patch_features(block_tokens), train=True)
    loss = _cross_entropy(upsample(logits, *labels.shape[1:]), labels)
    return loss, nnx.state(head, nnx.BatchStat)

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), batch_stats, opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_logits(graphdef, state, block_tokens):
  return nnx.merge(graphdef, state)(patch_features(block_tokens), train=False)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def _predict(logits: jax.Array, height: int, width: int) -> jax.Array:
  """(h, w, C) -> (height, width) classes, argmax of the bilinearly resized logits."""
  return jnp.argmax(upsample(logits, height, width), axis=-1).astype(jnp.uint8)


def _crop_batches(source, settings: SegSettings, batch_size: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Training crops (B, S, S, 3), labels (B, S, S), in a seeded order (each epoch a new
  permutation, every crop its own rng); the next batch is cut in threads meanwhile."""

  @functools.lru_cache(maxsize=8)  # The epochs of the batches being cut (tiny sets: several).
  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng([settings.seed, epoch]).permutation(len(source))

  def crop(step: int, slot: int):
    epoch, at = divmod(step * batch_size + slot, len(source))
    rng = np.random.default_rng([settings.seed, step, slot])
    image, labels = source[int(order(epoch)[at])]
    return seg_data.train_crop(image, labels, settings.image_size, rng,
                               scale_range=settings.scale_range)

  workers = max(1, settings.num_threads or min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    submit = lambda step: [pool.submit(crop, step, slot) for slot in range(batch_size)]
    pending = submit(0)
    for step in range(settings.iterations):
      done = [future.result() for future in pending]
      pending = submit(step + 1) if step + 1 < settings.iterations else []
      yield np.stack([image for image, _ in done]), np.stack([labels for _, labels in done])


def _colour(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Classes 0..C-1 -> palette[1..C]; the ignore index 255 -> palette[0] (black)."""
  return palette[(labels.astype(np.int32) + 1) % 256]


def train_readout(encoder: features_lib.Encoder, source, settings: SegSettings, *,
                  progress: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
  """Trains the readout on `source`'s crops: (graphdef, state) of the `LinearReadout`."""
  batch_size = encoder.padded_size(settings.batch_size)
  replicated = jax.sharding.NamedSharding(encoder.mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(encoder.mesh,
                                              jax.sharding.PartitionSpec(features_lib.DATA_AXIS))
  optimizer = make_optimizer(settings)
  step_fn = graphdef = params = batch_stats = opt_state = None
  batches = _crop_batches(source, settings, batch_size)
  with tqdm.tqdm(total=settings.iterations, unit="step", desc="seg readout",
                 disable=not progress, dynamic_ncols=True) as bar:
    for images, labels in batches:
      block_tokens = encoder(images, pad_to=batch_size)["block_tokens"]
      if step_fn is None:  # The feature width is known from the first batch.
        head = LinearReadout(block_tokens.shape[1] * block_tokens.shape[3], source.num_classes,
                             rngs=nnx.Rngs(settings.seed))
        graphdef, params, batch_stats = nnx.split(head, nnx.Param, nnx.BatchStat)
        params, batch_stats = jax.device_put((params, batch_stats), replicated)
        opt_state = jax.device_put(optimizer.init(params), replicated)
        step_fn = jax.jit(functools.partial(_train_step, graphdef, optimizer))
      params, batch_stats, opt_state, loss = step_fn(
          params, batch_stats, opt_state, block_tokens, jax.device_put(labels, batch_sharding))
      bar.update(1)
      if progress and bar.n % 50 == 0:
        bar.set_postfix(loss=f"{float(loss):.3f}")
  return graphdef, nnx.merge_state(params, batch_stats)


def predict(encoder: features_lib.Encoder, graphdef: nnx.GraphDef, state: nnx.State, source,
            settings: SegSettings, *, progress: bool = True
            ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
  """(index, image, labels, predicted classes (H, W) uint8 at the annotation's size) for every
  image of `source`, in order."""
  batch_size = encoder.padded_size(settings.batch_size)
  for start in tqdm.trange(0, len(source), batch_size, desc="seg eval", disable=not progress,
                           dynamic_ncols=True):
    samples = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    images = np.stack([seg_data.eval_image(image, settings.image_size) for image, _ in samples])
    logits = _eval_logits(graphdef, state,
                          encoder(images, pad_to=batch_size)["block_tokens"])
    for offset, (image, labels) in enumerate(samples):
      yield (start + offset, image, labels,
             np.asarray(_predict(logits[offset], *labels.shape)))


def save_readout(path: str, state: nnx.State) -> None:
  """The readout's parameters and BatchNorm statistics (a flax.nnx pure dict), orbax."""
  checkpoint.save_pytree(path, nnx.to_pure_dict(state), overwrite=True)


def evaluate_seg(backbone: Callable[..., dict[str, jax.Array]] | nnx.Module, train, val,
                 settings: SegSettings = SegSettings(), *, out_dir: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
  """Trains the linear readout on `train` and measures it on `val` (`seg_data` sources).

  Args:
    backbone: the ViT (or a function of normalised images with `num_last_blocks`) whose
      `block_tokens` (B, n, N, D) the readout reads; frozen.
    train, val: sources with the same classes (`seg_data.open_seg_source`).
    settings: the recipe (`SegSettings`).
    out_dir: when given, writes OUT/pred/NAME.png (the dataset's labels, 1..C, at the
      annotation's size), OUT/pictures/NAME.png (image | truth | prediction) for the first
      `num_pictures` images, and OUT/readout/ (orbax).
    progress: tqdm bars.

  Returns:
    {"mIoU", "aAcc", "mAcc" (percent), "per_class_IoU" {name: IoU or None}, counts and the
    settings}.
  """
  if train.num_classes != val.num_classes:
    raise seg_data.SegError(f"{train.name} has {train.num_classes} classes but {val.name} "
                            f"{val.num_classes}.")
  if len(train) == 0 or len(val) == 0:
    raise seg_data.SegError(f"{train.name if not len(train) else val.name} has no images.")
  encoder = features_lib.Encoder(backbone, ("block_tokens",), num_last_blocks=settings.blocks)
  graphdef, state = train_readout(encoder, train, settings, progress=progress)
  num_classes = val.num_classes
  totals = np.zeros((3, num_classes), np.int64)  # intersection, union, label area.
  palette = davis.default_palette()
  if out_dir:
    for sub in (PRED_DIR, PICTURES_DIR):
      os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  for index, image, labels, prediction in predict(encoder, graphdef, state, val, settings,
                                                  progress=progress):
    intersect, union, _, area_label = intersect_and_union(prediction, labels, num_classes)
    totals += np.stack([intersect, union, area_label])
    if out_dir:
      name = val.names[index]
      Image.fromarray(seg_data.to_dataset_labels(prediction)).save(
          os.path.join(out_dir, PRED_DIR, name + ".png"))
      if index < settings.num_pictures:
        picture = np.concatenate([image, _colour(labels, palette), _colour(prediction, palette)],
                                 axis=1)
        Image.fromarray(picture).save(os.path.join(out_dir, PICTURES_DIR, name + ".png"))
  if out_dir:
    save_readout(os.path.join(out_dir, READOUT_DIR), state)
  metrics = mean_iou(*totals)
  names = val.class_names or [str(c) for c in range(num_classes)]
  return {"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"], "mAcc": metrics["mAcc"],
          "per_class_IoU": dict(zip(names, metrics["IoU"])), "num_classes": num_classes,
          "num_train": len(train), "num_val": len(val),
          "settings": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(settings).items()}}


# ---- The evaluator (dora_jax.evaluation.registry): `dora-eval seg`, config.evals.NAME. ----


def add_flags(parser: argparse.ArgumentParser, base) -> None:
  """The flags; those left at None take `SegSettings`' defaults (DINOv2's ADE20K linear head)."""
  del base
  positive = registry.positive_int
  parser.add_argument("--data", default="", help="The ADE20K layout (images/, annotations/).")
  parser.add_argument("--train", default="", help="Instead of --data: tfds:NAME:SPLIT.")
  parser.add_argument("--val", default="", help="Instead of --data: tfds:NAME:SPLIT.")
  parser.add_argument("--tfds-data-dir", default="", help="data_dir of tfds sources.")
  parser.add_argument("--num-classes", type=int, default=0,
                      help="C (0: the class names in ROOT, else ADE20K's 150).")
  parser.add_argument("--iterations", type=positive, default=None,
                      help="Training steps (40000).")
  parser.add_argument("--batch-size", type=positive, default=None, help="Crops per step (16).")
  parser.add_argument("--image-size", type=positive, default=None,
                      help="Crop side, and the evaluation resolution (512).")
  parser.add_argument("--blocks", type=int, choices=(1, 4), default=None,
                      help="Patch tokens of the last n blocks (1).")
  parser.add_argument("--lr", type=float, default=None, help="AdamW's peak lr (1e-3).")
  parser.add_argument("--seed", type=int, default=None, help="Crops and initialisation (0).")


class Evaluator:
  """The linear readout with `DEFAULTS`' settings; see `registry` for the interface."""

  def __init__(self, values: Mapping[str, Any], *, name_of: Callable[[str], str],
               run: registry.Run | None = None):
    self.name_of = name_of
    data, train, val = values["data"], values["train"], values["val"]
    if bool(train) != bool(val) or bool(data) == bool(train):
      raise registry.SettingError(
          f"give {name_of('data')} ROOT (the ADE20K layout) or both {name_of('train')} and "
          f"{name_of('val')} (tfds:NAME:SPLIT), not both.")
    given = {key: values[key] for key in ("iterations", "batch_size", "image_size", "blocks",
                                          "lr", "seed") if values[key] is not None}
    if run is not None:  # A short readout on the run's image size, its seed, no pictures.
      given.update(num_pictures=0)
      if not given.get("image_size"):
        given["image_size"] = run.image_size
      if given.get("seed", -1) < 0:
        given["seed"] = run.seed
    registry.check_positive(given, tuple(k for k in ("iterations", "batch_size", "image_size",
                                                      "blocks") if k in given), name_of)
    self.settings = SegSettings(**given)
    self.sources = [seg_data.open_seg_source(spec, split, num_classes=values["num_classes"],
                                             tfds_data_dir=values["tfds_data_dir"] or None)
                    for spec, split in ((train or data, "training"), (val or data, "validation"))]
    if run is not None:  # During pretraining: decoded once, kept in memory.
      self.sources = [seg_data.InMemorySource(source) for source in self.sources]

  def check(self, size) -> None:
    if self.settings.image_size % size.patch_size:
      raise registry.SettingError(
          f"{self.name_of('image_size')} {self.settings.image_size} is not a multiple of the "
          f"checkpoint's patch size {size.patch_size}; the patch grid must tile the image.")
    if self.settings.blocks > size.depth:
      raise registry.SettingError(f"{self.name_of('blocks')} {self.settings.blocks} exceeds the "
                                  f"checkpoint's {size.depth} blocks.")

  def run(self, backbone, *, out_dir: str | None = None, progress: bool = False) -> dict:
    self.check(backbone.size)
    report = evaluate_seg(backbone, *self.sources, self.settings, out_dir=out_dir,
                          progress=progress)
    return dict(report, train=self.sources[0].name, val=self.sources[1].name)

  def summary(self, report: dict) -> str:
    fmt = lambda value: "n/a" if value is None else f"{value:.2f}"
    return (f"linear segmentation ({report['num_classes']} classes, "
            f"{report['settings']['iterations']} iterations, "
            f"{report['settings']['image_size']} px): mIoU {fmt(report['mIoU'])}, "
            f"aAcc {fmt(report['aAcc'])}, mAcc {fmt(report['mAcc'])}")
