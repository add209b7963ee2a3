"""The training loop behind `dora-train`: config -> checks -> mesh -> state -> jitted step -> loop.

Read top to bottom, `train_and_evaluate` does:
  1. checks the config, the work folder and the data (one-line `ConfigError`s, before anything is
     written or compiled);
  2. builds the ('data', 'fsdp') mesh, the state's shapes (`jax.eval_shape`) and its shardings;
  3. jits the train step of `train_step.py` with those shardings and the state donated;
  4. restores the newest intact checkpoint of the work folder (state + data position) or
     initialises (a damaged newer checkpoint is reported and set aside);
  5. loops: step, metrics, pictures, checkpoints, until `total_steps` or SIGTERM (preemption),
     which saves and returns; a non-finite loss stops the run, keeping the last good checkpoint.
"""
import os
import shutil
import signal
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from dora_jax import checkpoints as checkpoints_lib
from dora_jax import metrics as metrics_lib
from dora_jax import models
from dora_jax import sharding as sharding_lib
from dora_jax import train_step
from dora_jax import visualize
from dora_jax import workdir_lock
from dora_jax.data import pipeline
from dora_jax.data import source
from dora_jax.models import vit

DEMO_DATA_DIR = "demo_data"  # Under the work folder, when config.data.synthetic is set.
PICTURES_DIR = "pictures"
# Seconds-valued metrics: they differ between two runs of the same steps.
TIMING_METRICS = ("step_time", "frames_per_second")


class ConfigError(ValueError):
  """Bad input found before training starts: a config key, the work folder or the data."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


# ---- 1. Checks (nothing written, nothing compiled). ----


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks the keys whose mistakes would otherwise surface deep inside a compile or a worker."""
  num_devices = jax.device_count()
  try:
    sharding_lib.mesh_shape(config.mesh, num_devices)
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
  if config.batch_size % jax.process_count():
    raise ConfigError(f"config batch_size={config.batch_size} does not divide over the "
                      f"{jax.process_count()} processes.")
  if config.data.frames_per_clip < 2:
    raise ConfigError(
        f"config data.frames_per_clip={config.data.frames_per_clip}: must be at least 2 (frame 0 "
        "is the anchor where objects are discovered, the others are where they are tracked).")
  try:
    size = vit.resolve_size(config.model.variant, **models.size_overrides(config.model))
  except ValueError as e:
    raise ConfigError(f"config model: {e}") from None
  if config.dora.enabled and not 1 <= config.dora.num_objects <= size.num_heads:
    raise ConfigError(
        f"config dora.num_objects={config.dora.num_objects}: must be between 1 and the "
        f"{size.num_heads} attention heads of the model (one head per object).")
  if config.dora.mask_mode not in ("remove", "keep"):
    raise ConfigError(
        f"config dora.mask_mode={config.dora.mask_mode!r}: expected 'remove' or 'keep'.")
  for key in ("global_size", "local_size"):
    if config.data[key] % size.patch_size:
      raise ConfigError(f"config data.{key}={config.data[key]} is not a multiple of the patch "
                        f"size {size.patch_size}.")
  if config.data.global_pre_size < config.data.global_size:
    raise ConfigError(
        f"config data.global_pre_size={config.data.global_pre_size} is smaller than "
        f"data.global_size={config.data.global_size}: the global views are cut from it.")
  for key in ("checkpoint_every_steps", "log_every_steps"):
    if config[key] < 1:
      raise ConfigError(f"config {key}={config[key]}: must be at least 1.")
  if config.total_steps < 0 or (config.total_steps == 0 and config.epochs <= 0):
    raise ConfigError(f"config total_steps={config.total_steps}, epochs={config.epochs}: set "
                      "total_steps > 0, or total_steps=0 and epochs > 0.")


def check_workdir(workdir: str) -> None:
  """The work folder (or, if it does not exist yet, its nearest existing parent) is writable."""
  if not workdir:
    raise ConfigError("--workdir is empty: pass the folder for checkpoints and logs.")
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
    data_config.dir = os.path.join(workdir, DEMO_DATA_DIR, "shards")
  elif not config.data.dir:
    raise ConfigError("config data.dir is empty: pass --config.data.dir=FOLDER (written by "
                      "dora-convert), or train on the synthetic tour with configs/demo.py.")
  return data_config


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Makes the synthetic tour if asked, checks the data against the config; returns data config.

  If the check fails, what this call created (the synthetic tour, the work folder) is removed.
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
    manifest = pipeline.validate(data_config)
    if config.data.num_videos:
      videos = source.select_videos(manifest, tuple(data_config.video_ids), data_config.dir)
      if not 0 < config.data.num_videos <= len(videos):
        raise ValueError(f"config data.num_videos={config.data.num_videos}: {data_config.dir} "
                         f"has {len(videos)} (selected) videos.")
      data_config.video_ids = tuple(v["id"] for v in videos[:config.data.num_videos])
      pipeline.validate(data_config)
  except (ValueError, OSError) as e:
    for path in created[:1]:
      shutil.rmtree(path, ignore_errors=True)
    raise ConfigError(str(e).strip().splitlines()[0]) from None
  return data_config


def schedule_length(config: ml_collections.ConfigDict, num_clips: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): an epoch is num_clips // batch_size steps (at least 1)."""
  steps_per_epoch = max(1, num_clips // config.batch_size)
  total_steps = config.total_steps or int(config.epochs * steps_per_epoch)
  return steps_per_epoch, total_steps


# ---- 2. State shapes and shardings. ----


def abstract_train_state(config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                         total_steps: int) -> tuple[Any, Any]:
  """(graphdef, state as jax.ShapeDtypeStructs): the shapes, with nothing allocated."""
  graphdefs = []

  def init_state(rng):
    graphdef, state = train_step.init_train_state(
        config, rng=rng, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    graphdefs.append(graphdef)
    return state

  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  return graphdefs[0], abstract_state


# ---- 5. Helpers of the loop. ----


class _Preemption:
  """SIGTERM (a preempted VM, `scancel`, Ctrl-\\ in a pod) asks the loop to save and stop.

  With several processes jax's preemption service, which handles SIGTERM itself, makes the hosts
  agree on the step at which all of them save.
  """

  def __init__(self, checkpointer: checkpoints_lib.Checkpointer):
    self._checkpointer = checkpointer
    self._requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._requested
    return self._checkpointer.reached_preemption(step)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def with_finite_check(step_fn):
  """Adds metric `finite`: the loss and every updated student parameter are finite.

  Checked inside the jitted step (one pass over the parameters), so that a state that has just
  gone NaN is never saved, even when the loss computed from it is not known yet.
  """

  def step(state, batch):
    new_state, metrics = step_fn(state, batch)
    leaves = jax.tree.leaves(new_state["student"])
    finite = jnp.isfinite(metrics["loss"])
    for leaf in leaves:
      finite &= jnp.all(jnp.isfinite(leaf))
    return new_state, dict(metrics, finite=finite)

  return step


def _first_non_finite(history: list[tuple[int, dict]]) -> tuple[int, dict] | None:
  for step, metrics in history:
    if not metrics["finite"]:
      return step, metrics
  return None


def _write_picture(workdir: str, step: int, arrays: dict[str, np.ndarray],
                   writer: metrics_lib.MetricWriter) -> str:
  picture = visualize.make_picture(
      arrays["frames"], arrays["heatmaps"], arrays["masked_views"], arrays.get("masks"),
      title=f"step {step}")
  os.makedirs(os.path.join(workdir, PICTURES_DIR), exist_ok=True)
  path = os.path.join(workdir, PICTURES_DIR, f"step_{step:07d}.png")
  visualize.save_picture(path, picture)
  writer.write_image(step, "tracking", picture)
  return path


# ---- The run. ----


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run of `config` in `workdir`; returns the last logged metrics.

  Raises:
    ConfigError: bad input, found before anything is written or compiled.
    workdir_lock.WorkdirLockedError: another live run uses `workdir`.
    checkpoints.CheckpointMismatchError: the work folder holds a checkpoint of another model.
    checkpoints.CheckpointDamagedError: it holds checkpoints, but none is intact.
    checkpoints.CheckpointSaveError: a save failed (e.g. a full disk); older checkpoints stay.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
  """
  workdir = os.path.abspath(workdir)
  # 1. Checks; then the work folder is ours until the run ends.
  check_config(config)
  check_workdir(workdir)
  with workdir_lock.run_lock(workdir, command="dora-train"):
    return _train_locked(config, workdir)


def _train_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  data_config = prepare_data(config, workdir)
  steps_per_epoch, total_steps = schedule_length(config, pipeline.num_clips(data_config))
  is_primary = jax.process_index() == 0

  # 2. Mesh, state shapes and shardings.
  mesh = sharding_lib.make_mesh(config.mesh)
  graphdef, abstract_state = abstract_train_state(
      config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  logging.info("Mesh %s; %d steps (%d per epoch), global batch %d clips.", dict(mesh.shape),
               total_steps, steps_per_epoch, config.batch_size)

  # 3. The jitted step: one compile per run (the batch shapes never change).
  update = jax.jit(
      with_finite_check(train_step.make_train_step(
          config, graphdef, steps_per_epoch=steps_per_epoch, total_steps=total_steps)),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0)
  picture_fn = None
  if config.picture_every_steps:
    picture_fn = jax.jit(train_step.make_visualize_fn(config, graphdef),
                         out_shardings=replicated)

  # 4. Restore or initialise.
  checkpointer = checkpoints_lib.Checkpointer(
      os.path.join(workdir, checkpoints_lib.CHECKPOINT_DIR), keep=config.keep_checkpoints)
  # The newest intact checkpoint (damaged newer ones are reported and set aside).
  restored = checkpointer.restore_latest(
      sharding_lib.with_shardings(abstract_state, state_sharding))
  data_state = None
  if restored is not None:
    state, data_state = restored
  else:
    init = jax.jit(
        lambda rng: train_step.init_train_state(
            config, rng=rng, steps_per_epoch=steps_per_epoch, total_steps=total_steps)[1],
        out_shardings=state_sharding)
    state = init(jax.random.PRNGKey(config.seed))
  start_step = int(jax.device_get(state["step"]))
  if start_step >= total_steps:
    logging.info("The run in %s is complete (%d of %d steps).", workdir, start_step, total_steps)
  data_iter = pipeline.make_train_iterator(
      data_config, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if data_state is not None:
    data_iter.set_state(data_state)
  if is_primary:
    checkpoints_lib.write_config(workdir, config)

  # 5. The loop.
  writer = metrics_lib.MetricWriter(workdir, start_step=start_step, total_steps=total_steps,
                                    enabled=is_primary)
  preemption = _Preemption(checkpointer)
  frames_per_step = config.batch_size * config.data.frames_per_clip
  history = []  # (step, metrics on the device) since the last fetch; fetched in one go.
  last_metrics = {}
  timer_start, timer_steps = None, 0
  if start_step < total_steps:
    logging.info("Compiling the train step (the first step takes a while).")
  try:
    for step in range(start_step + 1, total_steps + 1):  # `step` updates done after this one.
      batch = sharding_lib.global_batch(next(data_iter), batch_sharding)
      state, step_metrics = update(state, batch)
      history.append((step, step_metrics))
      if timer_start is None:  # Time from the end of the first (compiling) step.
        jax.block_until_ready(state)
        timer_start, timer_steps = time.perf_counter(), 0
      else:
        timer_steps += 1

      stop = preemption.reached(step)
      is_last = step == total_steps
      log_now = step % config.log_every_steps == 0 or is_last
      save_now = step % config.checkpoint_every_steps == 0 or is_last or stop
      if log_now or save_now:
        fetched = jax.device_get(history)
        history = []
        bad = _first_non_finite(fetched)
        if bad is not None:
          bad_step, bad_metrics = bad
          what = (f"the loss is {float(bad_metrics['loss'])}" if not np.isfinite(
              bad_metrics["loss"]) else "the parameters are not finite")
          checkpointer.wait_until_finished()
          last_good = checkpointer.latest_step()
          raise NonFiniteLossError(
              f"{what} at step {bad_step}: stopping. " + (
                  f"The last good checkpoint is step {last_good} in {checkpointer.directory}"
                  if last_good is not None else "No checkpoint was saved before it, so the "
                  "next run starts from scratch") + "; change the config (e.g. a lower "
              "--config.optim.base_lr) and run again.")
        if log_now:
          last_metrics = {name: float(value) for name, value in fetched[-1][1].items()
                          if name != "finite"}
          elapsed = time.perf_counter() - timer_start
          if timer_steps:
            last_metrics["step_time"] = elapsed / timer_steps
            last_metrics["frames_per_second"] = frames_per_step * timer_steps / elapsed
          writer.write_scalars(step, last_metrics)
          timer_start, timer_steps = time.perf_counter(), 0
      if picture_fn is not None and (step % config.picture_every_steps == 0 or is_last):
        arrays = jax.device_get(picture_fn(state, batch, jax.random.fold_in(
            jax.random.PRNGKey(config.seed), step)))
        if is_primary:
          _write_picture(workdir, step, arrays, writer)
      if save_now:
        checkpointer.save(step, state, data_iter.get_state())
      writer.advance(step)
      if stop and not is_last:
        writer.message(f"SIGTERM: saved step {step} to {checkpointer.directory}; run the same "
                       "command again to resume.")
        break
  finally:
    try:
      # Saves in flight finish (or the last good one stays) before the process goes.
      checkpointer.wait_until_finished()
    finally:  # Also when that save failed.
      checkpointer.close()
      preemption.close()
      writer.close()
      if hasattr(data_iter, "close"):  # Stops grain's worker processes and frees their memory.
        data_iter.close()
  return last_metrics
