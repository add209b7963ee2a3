"""What `dora-train` checks before anything is written or compiled, in one place.

Each rule has one owner, and these functions ask it: the model, DoRA and mesh sections are parsed
once into the run's plan (`plan.TrainPlan`: `dino.ModelOptions`, `objects.DoraOptions`,
`sharding.MeshPlan`), which `check_config` returns; the data is planned by
`data.pipeline.plan_clips`. Every failure is a `ConfigError` with one line naming the key,
folder or value that is wrong and what to do.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from dora_jax.data import pipeline
from dora_jax import paths
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import sharding

DEMO_DATA_DIR = "demo_data"  # Under the work folder, when config.data.synthetic is set.


class ConfigError(ValueError):
  """Bad input found before training starts: a config key, the work folder or the data."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What a start of `dora-train` derives from its config, work folder and data."""
  workdir: str
  data_config: ml_collections.ConfigDict  # config.data with `dir` resolved.
  clips: pipeline.ClipPlan
  steps_per_epoch: int
  total_steps: int


def check_run_keys(config: ml_collections.ConfigDict, *,
                   min_checkpoint_every_steps: int = 1) -> None:
  """Checks the keys dora-train and dora-finetune share (config_base.add_run_length_keys and
  add_mesh_and_cadence_keys): the mesh, the batch, the cadences, the run length.

  Args:
    min_checkpoint_every_steps: 1, or 0 where 0 means "at validations and the end only"
      (dora-finetune).
  """
  num_devices, num_processes = jax.device_count(), jax.process_count()
  try:
    sharding.MeshPlan.from_config(config.mesh).shape(num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.batch_size < 1:
    raise ConfigError(f"config batch_size={config.batch_size}: must be a positive multiple of the "
                      f"{num_devices} devices (e.g. --config.batch_size={num_devices}).")
  if config.batch_size % num_devices:
    raise ConfigError(
        f"config batch_size={config.batch_size} does not divide over the {num_devices} devices: "
        f"use a multiple of {num_devices} (e.g. --config.batch_size="
        f"{max(1, round(config.batch_size / num_devices)) * num_devices}).")
  if config.batch_size % num_processes:
    raise ConfigError(f"config batch_size={config.batch_size} does not divide over the "
                      f"{num_processes} processes.")
  for key, minimum in (("checkpoint_every_steps", min_checkpoint_every_steps),
                       ("log_every_steps", 1)):
    if config[key] < minimum:
      raise ConfigError(f"config {key}={config[key]}: must be at least {minimum}.")
  if config.total_steps < 0 or (config.total_steps == 0 and config.epochs <= 0):
    raise ConfigError(f"config total_steps={config.total_steps}, epochs={config.epochs}: set "
                      "total_steps > 0, or total_steps=0 and epochs > 0.")


def check_config(config: ml_collections.ConfigDict) -> plan_lib.TrainPlan:
  """Checks the keys whose mistakes would otherwise surface deep inside a compile or a worker;
  returns the run's plan (the model, DoRA and mesh sections, parsed once)."""
  check_run_keys(config)
  try:
    plan = plan_lib.TrainPlan.from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if plan.dora_enabled:
    if config.data.frames_per_clip < 2:
      raise ConfigError(
          f"config data.frames_per_clip={config.data.frames_per_clip}: must be at least 2 "
          "(frame 0 is the anchor where objects are discovered, the others are where they are "
          "tracked).")
    if config.data.global_crops_per_frame != 1:
      raise ConfigError(
          f"config data.global_crops_per_frame={config.data.global_crops_per_frame}: DoRA masks "
          "one global view per frame; use 1, or dora.enabled=False for DINO's two crops.")
  elif config.data.global_crops_per_frame == 1 and config.data.num_local_crops == 0:
    raise ConfigError("config dora.enabled=False (DINO) with data.global_crops_per_frame=1 and "
                      "data.num_local_crops=0 leaves no pair of different views to learn from.")
  for key in ("global_size", "local_size"):
    if config.data[key] % plan.model.size.patch_size:
      raise ConfigError(f"config data.{key}={config.data[key]} is not a multiple of the patch "
                        f"size {plan.model.size.patch_size}.")
  if 0 < config.data.global_pre_size < config.data.global_size:
    raise ConfigError(
        f"config data.global_pre_size={config.data.global_pre_size} is smaller than "
        f"data.global_size={config.data.global_size}: the global views are cut from it.")
  return plan


def check_workdir(workdir: str) -> None:
  """The work folder (or, if it does not exist yet, its nearest existing parent) is writable."""
  if not workdir:
    raise ConfigError("--workdir is empty: pass the folder for checkpoints and logs.")
  if paths.is_remote(workdir):  # A cloud URL: its library reports access errors when writing.
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir {workdir} exists and is not a folder.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir} is not writable ({existing} is not a writable "
                      "folder): choose another --workdir or fix its permissions.")


def data_config_for(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """config.data with `dir` resolved (the synthetic tour lives in the work folder)."""
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  if config.data.synthetic:
    if paths.is_remote(workdir):
      raise ConfigError(f"config data.synthetic=True makes the synthetic tour in the work folder, "
                        f"which must be local; got --workdir {workdir}.")
    data_config.dir = os.path.join(workdir, DEMO_DATA_DIR, "shards")
  elif not config.data.dir:
    raise ConfigError("config data.dir is empty: pass --config.data.dir=FOLDER (written by "
                      "dora-convert), or train on the synthetic tour with configs/demo.py.")
  return data_config


def prepare_data(config: ml_collections.ConfigDict, workdir: str
                 ) -> tuple[ml_collections.ConfigDict, pipeline.ClipPlan]:
  """Makes the synthetic tour if asked and plans the clips: (data config, clip plan).

  If the data does not fit the config, what this call created (the synthetic tour, the work
  folder) is removed.
  """
  data_config = data_config_for(config, workdir)
  created = []
  if config.data.synthetic:
    from dora_jax.data import synthetic  # Only the demo needs the video generator.

    for path in (workdir, os.path.join(workdir, DEMO_DATA_DIR)):
      if not os.path.exists(path):
        created.append(path)
    logging.info("Preparing the synthetic walking tour in %s", data_config.dir)
    # Process 0 first: on a shared work folder the others then find it complete.
    if jax.process_index() == 0:
      synthetic.ensure_demo_data(os.path.join(workdir, DEMO_DATA_DIR))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dora_jax demo data")
      synthetic.ensure_demo_data(os.path.join(workdir, DEMO_DATA_DIR))
  try:
    clips = pipeline.plan_clips(data_config)
  except (ValueError, OSError) as e:
    for path in created[:1]:
      shutil.rmtree(path, ignore_errors=True)
    raise ConfigError(str(e).strip().splitlines()[0]) from None
  return data_config, clips


def schedule_length(config: ml_collections.ConfigDict, num_clips: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): an epoch is num_clips // batch_size steps (at least 1)."""
  steps_per_epoch = max(1, num_clips // config.batch_size)
  total_steps = config.total_steps or int(config.epochs * steps_per_epoch)
  return steps_per_epoch, total_steps


def plan_run(config: ml_collections.ConfigDict, workdir: str) -> RunPlan:
  """The data checks (after `check_config` and `check_workdir`); returns the run's plan."""
  workdir = paths.absolute(workdir)
  data_config, clips = prepare_data(config, workdir)
  steps_per_epoch, total_steps = schedule_length(config, clips.num_clips)
  return RunPlan(workdir, data_config, clips, steps_per_epoch, total_steps)
