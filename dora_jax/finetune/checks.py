"""What `dora-finetune` checks before anything is written or compiled, and the data it prepares.

Every failure is a `ConfigError` (a `preflight.ConfigError`) with one line naming the key, folder
or value that is wrong and what to do.
"""
import os
from typing import Any

import jax
import ml_collections

from dora_jax.data import images as images_lib
from dora_jax.finetune import model as model_lib
from dora_jax.models import dino
from dora_jax import paths
from dora_jax.trainer import preflight


DEMO_IMAGES_DIR = "demo_images"  # Under the work folder: the demo's generated image folders.
INITS = ("pretrained", "random")  # backbone.init values.


class ConfigError(preflight.ConfigError):
  """Bad input found before training starts: a config key, the work folder, images, backbone."""


# ---- 1. Checks (nothing written, nothing compiled). ----


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the keys whose mistakes would otherwise surface deep inside a compile or a worker;
  those dora-train shares (mesh, batch, cadences, run length) by `preflight.check_run_keys`."""
  if config.mode not in model_lib.MODES:
    raise ConfigError(f"config mode={config.mode!r}: expected one of {model_lib.MODES}.")
  if config.backbone.init not in INITS:
    raise ConfigError(f"config backbone.init={config.backbone.init!r}: expected one of {INITS}.")
  if config.compare_random_init and config.backbone.init != "pretrained":
    raise ConfigError("config compare_random_init=True compares a pretrained backbone with a "
                      "random one: it needs backbone.init='pretrained'.")
  if not config.backbone.path:
    raise ConfigError("config backbone.path is empty: pass --config.backbone.path=PATH (a "
                      "dora-train work folder, its checkpoints/STEP, or a dora-export folder).")
  try:
    preflight.check_run_keys(config, min_checkpoint_every_steps=0)
  except preflight.ConfigError as e:
    raise ConfigError(str(e)) from None
  try:
    dino.compute_dtype(config.backbone.compute_dtype)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  checks = (
      ("linear.num_last_blocks", config.linear.num_last_blocks >= 1, "at least 1"),
      ("full.layer_decay", 0 < config.full.layer_decay <= 1, "in (0, 1]"),
      ("full.label_smoothing", 0 <= config.full.label_smoothing < 1, "in [0, 1)"),
      ("full.drop_path_rate", 0 <= config.full.drop_path_rate < 1, "in [0, 1)"),
      ("optim.base_lr", config.optim.base_lr > 0, "positive"),
      ("optim.warmup_epochs", config.optim.warmup_epochs >= 0, "at least 0"),
      ("data.image_size", config.data.image_size >= 1, "at least 1"),
      ("data.flip_prob", 0 <= config.data.flip_prob <= 1, "a probability"),
      ("data.val_crop_fraction", 0 < config.data.val_crop_fraction <= 1, "in (0, 1]"),
      ("data.crop_scale", 0 < config.data.crop_scale[0] <= config.data.crop_scale[1] <= 1,
       "(low, high) with 0 < low <= high <= 1"),
      ("data.num_workers", config.data.num_workers >= 0, "at least 0"),
      ("data.num_threads", config.data.num_threads >= 1, "at least 1"),
      ("eval_every_epochs", config.eval_every_epochs >= 1, "at least 1"),
  )
  for key, ok, expected in checks:
    if not ok:
      value = config
      for part in key.split("."):
        value = value[part]
      raise ConfigError(f"config {key}={value!r}: must be {expected}.")


def check_workdir(workdir: str) -> None:
  """The work folder (or, if it does not exist yet, its nearest existing parent) is writable."""
  try:
    preflight.check_workdir(workdir)
  except preflight.ConfigError as e:
    raise ConfigError(str(e)) from None


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Opens (making the demo's images if asked) the training and validation sources.

  Returns {"train": source, "val": source, "specs": {"train": str, "val": str}}.
  """
  specs = {"train": config.data.train, "val": config.data.val}
  if config.data.demo:
    from dora_jax.finetune import demo_data  # pylint: disable=g-import-not-at-top

    if paths.is_remote(workdir):
      raise ConfigError(f"config data.demo=True makes the demo's images in the work folder, "
                        f"which must be local; got --workdir {workdir}.")
    # Process 0 first; on a shared work folder the others then find it complete (file lock).
    root = os.path.join(workdir, DEMO_IMAGES_DIR)
    if jax.process_index() == 0:
      specs = demo_data.ensure_demo_images(root)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("dora_jax finetune demo images")
      specs = demo_data.ensure_demo_images(root)
  sources = {}
  for split, spec in specs.items():
    if not spec:
      raise ConfigError(f"config data.{split} is empty: pass an image folder (ROOT/CLASS/IMAGE) "
                        "or tfds:NAME:SPLIT, or use the demo's images (data.demo=True).")
    try:
      sources[split] = images_lib.open_source(spec, tfds_data_dir=config.data.tfds_data_dir)
    except ValueError as e:
      raise ConfigError(f"config data.{split}: {e}") from None
  if sources["train"].class_names != sources["val"].class_names:
    raise ConfigError(
        f"data.train ({specs['train']}) has classes {list(sources['train'].class_names)[:8]} but "
        f"data.val ({specs['val']}) has {list(sources['val'].class_names)[:8]}: they must be the "
        "same (the labels are their sorted order).")
  if len(sources["train"]) < config.batch_size:
    raise ConfigError(f"data.train has {len(sources['train'])} images, fewer than one batch "
                      f"(batch_size={config.batch_size}): lower batch_size.")
  return dict(sources, specs=specs)
