"""The training loop behind `dora-train`, read top to bottom in banner sections.

  checks      `preflight`: config and work folder, then (the folder locked) the data
              (one-line `ConfigError`s, before anything is written or compiled); the clip plan
              and the run length.
  mesh        the ('data', 'fsdp') mesh, the state's shapes (`jax.eval_shape`), its shardings.
  update      the train step of `train_step.py`, jitted with those shardings, state donated.
  checkpoint  restore the newest intact checkpoint of the work folder (state + data position; a
              damaged newer one is reported and set aside) or initialise.
  input       the grain iterator of this host's batches, at the restored position.
  loop        step, metrics, pictures, evaluators (`config.eval`), checkpoints, until
              `total_steps` or SIGTERM (preemption), which saves and returns; a non-finite loss
              stops the run, keeping the last good checkpoint.

The work folder is locked (`workdir_lock`) for the whole run: a second run on it stops at once.
"""
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dora_jax.data import pipeline
from dora_jax.evaluation import periodic
from dora_jax import paths
from dora_jax.trainer import checkpoints as checkpoints_lib
from dora_jax.trainer import compilation
from dora_jax.trainer import flops as flops_lib
from dora_jax.trainer import lock as workdir_lock
from dora_jax.trainer import metrics as metrics_lib
from dora_jax.trainer import pictures
from dora_jax.trainer import preflight
from dora_jax.trainer import schedules
from dora_jax.trainer import sharding as sharding_lib
from dora_jax.trainer import step as train_step

PICTURES_DIR = "pictures"


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run of `config` in `workdir`; returns the last logged metrics.

  Raises:
    preflight.ConfigError: bad input, found before anything is written or compiled.
    checkpoints.CheckpointMismatchError: the work folder holds a checkpoint of another model.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    workdir_lock.WorkdirLockedError: another live run uses `workdir`.
    checkpoints.CheckpointDamagedError: it holds checkpoints, but none is intact.
    checkpoints.CheckpointSaveError: a save failed (e.g. a full disk); older checkpoints stay.
  """
  # ---- Checks: nothing is written or compiled before they pass; then the folder is ours. ----
  workdir = paths.absolute(workdir)
  preflight.check_config(config)
  preflight.check_workdir(workdir)
  with workdir_lock.run_lock(workdir, command="dora-train"):
    return _train_locked(config, workdir)


def _train_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  plan = preflight.plan_run(config, workdir)  # The data: checked, made (the demo's), planned.
  workdir, total_steps = plan.workdir, plan.total_steps
  is_primary = jax.process_index() == 0

  # ---- Evaluators: their data is read now, so bad data fails before anything compiles. ----
  evaluator = make_evaluator(config, plan)

  # ---- Mesh, state shapes and shardings. ----
  mesh = sharding_lib.make_mesh(config.mesh)
  graphdef, abstract_state = train_step.abstract_train_state(config)
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  logging.info("Mesh %s; %d steps (%d per epoch), global batch %d clips.", dict(mesh.shape),
               total_steps, plan.steps_per_epoch, config.batch_size)

  # ---- The update: one compile per run (the batch shapes never change), or a cache load. ----
  # The schedules are the step's inputs, computed here per step: the program holds no run
  # length, so a run extended on the same work folder loads it from the cache.
  compilation.enable_cache(config.compilation_cache_dir, workdir)
  schedule = schedules.make_schedules(config, steps_per_epoch=plan.steps_per_epoch,
                                      total_steps=total_steps)
  def jit_update(config, graphdef):
    return jax.jit(
        with_finite_check(train_step.make_train_step(config, graphdef)),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0)

  update = jit_update(config, graphdef)
  unrolled = None  # With the blocks scanned, the same step unrolled: for its FLOPs only.
  unrolled_config = train_step.unrolled_config(config)
  if unrolled_config is not None:
    unrolled = jit_update(unrolled_config, train_step.abstract_train_state(unrolled_config)[0])
  picture_fn = None
  if config.picture_every_steps:
    picture_fn = jax.jit(train_step.make_visualize_fn(config, graphdef),
                         out_shardings=replicated)

  # ---- Checkpoint: restore the latest, or initialise. ----
  checkpointer = checkpoints_lib.Checkpointer(
      paths.join(workdir, checkpoints_lib.CHECKPOINT_DIR), keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(
      sharding_lib.with_shardings(abstract_state, state_sharding))
  data_state = None
  if restored is not None:
    state, data_state = restored
  else:
    init = jax.jit(lambda rng: train_step.init_train_state(config, rng=rng)[1],
                   out_shardings=state_sharding)
    state = init(jax.random.PRNGKey(config.seed))
  start_step = int(jax.device_get(state["step"]))
  if start_step >= total_steps:
    logging.info("The run in %s is complete (%d of %d steps).", workdir, start_step, total_steps)

  # ---- Input: this host's share of the global batch, at the restored position. ----
  data_iter = pipeline.make_train_iterator(
      plan.clips, plan.data_config, batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  if data_state is not None:
    data_iter.set_state(data_state)
  if is_primary:
    checkpoints_lib.write_config(workdir, config)

  # ---- The loop. ----
  writer = metrics_lib.MetricWriter(workdir, start_step=start_step, total_steps=total_steps,
                                    enabled=is_primary)
  preemption = checkpoints_lib.Preemption(checkpointer)
  frames_per_step = config.batch_size * config.data.frames_per_clip
  history = []  # (step, metrics on the device) since the last fetch; fetched in one go.
  last_metrics = {}
  timer_start, timer_steps = None, 0
  compiled, once = None, {}  # The compiled step; what the next record carries once per start.
  peak = flops_lib.device_peak(config.model.compute_dtype)  # Per device; None: unknown.
  if start_step < total_steps:
    logging.info("Compiling the train step (the first step takes a while).")
  try:
    for step in range(start_step + 1, total_steps + 1):  # `step` updates done after this one.
      batch = sharding_lib.global_batch(next(data_iter), batch_sharding)
      inputs = jax.device_put(schedule.at(step - 1), replicated)
      if compiled is None:  # Compiled (or loaded from the cache) once, timed, with its FLOPs.
        compiled = compilation.compile_step(update, state, batch, inputs, unrolled=unrolled,
                                            loop_shards=mesh.size)
        once["compile_time"] = compiled.compile_seconds
        timer_start = time.perf_counter()
      state, step_metrics = compiled.executable(state, batch, inputs)
      history.append((step, step_metrics))
      timer_steps += 1

      stop = preemption.reached(step)
      is_last = step == total_steps
      log_now = step % config.log_every_steps == 0 or is_last
      save_now = step % config.checkpoint_every_steps == 0 or is_last or stop
      scores = {}
      if evaluator.due(step, total_steps):  # Every process runs it, on its own devices.
        evaluation_start = time.perf_counter()
        scores = evaluator.run(train_step.teacher_backbone(graphdef, state), step)
        timer_start += time.perf_counter() - evaluation_start  # Not train-step time.
        writer.message(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
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
          last_metrics.update(once)
          once = {}
          elapsed = time.perf_counter() - timer_start
          if timer_steps:
            last_metrics["step_time"] = elapsed / timer_steps
            last_metrics["frames_per_second"] = frames_per_step * timer_steps / elapsed
            last_metrics.update(flops_lib.rates(compiled.flops, elapsed / timer_steps, peak))
          last_metrics.update(scores)  # The evaluators' numbers join the step's record.
          writer.write_scalars(step, last_metrics)
          timer_start, timer_steps = time.perf_counter(), 0
      if picture_fn is not None and (step % config.picture_every_steps == 0 or is_last):
        arrays = jax.device_get(picture_fn(state, batch, jax.random.fold_in(
            jax.random.PRNGKey(config.seed), step)))
        if is_primary:
          _write_picture(workdir, step, arrays, writer)
      if scores and not log_now:
        writer.write_scalars(step, scores)
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


# ---- Helpers of the loop. ----


def make_evaluator(config: ml_collections.ConfigDict,
                   plan: preflight.RunPlan) -> periodic.PeriodicEvaluator:
  """The evaluators of `config.eval` (none by default); bad settings or data: ConfigError."""
  demo_tour = (os.path.join(plan.workdir, preflight.DEMO_DATA_DIR) if config.data.synthetic
               else None)
  try:
    return periodic.PeriodicEvaluator.from_config(config, demo_tour=demo_tour)
  except (ValueError, OSError) as e:
    raise preflight.ConfigError(str(e).strip().splitlines()[0]) from None


def with_finite_check(step_fn):
  """Adds metric `finite`: the loss and every updated student parameter are finite.

  Checked inside the jitted step (one pass over the parameters), so that a state that has just
  gone NaN is never saved, even when the loss computed from it is not known yet.
  """

  def step(state, batch, schedule):
    new_state, metrics = step_fn(state, batch, schedule)
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
  picture = pictures.make_picture(
      arrays["frames"], arrays["heatmaps"], arrays["masked_views"], arrays.get("masks"),
      title=f"step {step}")
  paths.makedirs(paths.join(workdir, PICTURES_DIR))
  path = paths.join(workdir, PICTURES_DIR, f"step_{step:07d}.png")
  pictures.save_picture(path, picture)
  writer.write_image(step, "tracking", picture)
  return path
