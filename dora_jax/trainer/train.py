"""DoRA pretraining behind `dora-train`, read top to bottom in banner sections.

  checks      `preflight`: config and work folder, then (the folder locked) the data
              (one-line `ConfigError`s, before anything is written or compiled); the run's
              plan (`plan.TrainPlan`: model, DoRA options, mesh, parsed once), the clip plan
              and the run length.
  mesh        the ('data', 'fsdp') mesh, the state's shapes (`jax.eval_shape`), its shardings.
  update      the train step of `step.py`, jitted with those shardings, state donated.
  checkpoint  restore the newest intact checkpoint of the work folder (state + data position; a
              damaged newer one is reported and set aside) or initialise.
  input       the grain iterator of this host's batches, at the restored position.
  loop        `loop.run`, the loop dora-finetune shares: step, metrics, evaluators
              (`config.evals`), pictures, checkpoints, until `total_steps` or SIGTERM
              (preemption), which saves and returns; a non-finite loss stops the run, keeping the
              last good checkpoint. This module gives it only what is DoRA's: the state, the
              update, the clips, the evaluators, the pictures.

The work folder is locked (`checkpoint.run_lock`) for the whole run: a second run on it stops at
once.
"""
from absl import logging
import jax
import ml_collections
import numpy as np

from dora_jax.data import pipeline
from dora_jax.evaluation import periodic
from dora_jax.evaluation import registry
from dora_jax import checkpoint
from dora_jax import paths
from dora_jax.trainer import compilation
from dora_jax.trainer import flops as flops_lib
from dora_jax.trainer import loop
from dora_jax.trainer import metrics as metrics_lib
from dora_jax.trainer import pictures
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import preflight
from dora_jax.trainer import schedules
from dora_jax.trainer import sharding as sharding_lib
from dora_jax.trainer import step as train_step

PICTURES_DIR = "pictures"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run of `config` in `workdir`; returns the last logged metrics.

  Raises:
    preflight.ConfigError: bad input, found before anything is written or compiled.
    checkpoint.CheckpointMismatchError: the work folder holds a checkpoint of another model.
    loop.NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    checkpoint.WorkdirLockedError: another live run uses `workdir`.
    checkpoint.CheckpointDamagedError: it holds checkpoints, but none is intact.
    checkpoint.CheckpointSaveError: a save failed (e.g. a full disk); older checkpoints stay.
  """
  # ---- Checks: nothing is written or compiled before they pass; then the folder is ours. ----
  workdir = paths.absolute(workdir)
  train_plan = preflight.check_config(config)  # The model, DoRA and mesh sections, parsed.
  preflight.check_workdir(workdir)
  with checkpoint.run_lock(workdir, command="dora-train"):
    return _train_locked(config, train_plan, workdir)


def _train_locked(config: ml_collections.ConfigDict, train_plan: plan_lib.TrainPlan,
                  workdir: str) -> dict[str, float]:
  plan = preflight.plan_run(config, workdir)  # The data: checked, made (the demo's), planned.
  workdir, total_steps = plan.workdir, plan.total_steps
  is_primary = jax.process_index() == 0

  # ---- Evaluators: their data is read now, so bad data fails before anything compiles. ----
  evaluator = make_evaluator(config, train_plan, plan)

  # ---- Mesh, state shapes and shardings. ----
  mesh = train_plan.mesh.make()
  graphdef, abstract_state = train_step.abstract_train_state(config, train_plan)
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh,
                                                train_plan.mesh.fsdp_min_size)
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
  def jit_update(train_plan, graphdef):
    return jax.jit(
        loop.with_finite_check(train_step.make_train_step(config, train_plan, graphdef),
                               trained=lambda state: state["student"]),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0)

  update = jit_update(train_plan, graphdef)
  unrolled = None  # With the blocks scanned, the same step unrolled: for its FLOPs only.
  unrolled_plan = train_plan.unrolled()
  if unrolled_plan is not None:
    unrolled = jit_update(unrolled_plan,
                          train_step.abstract_train_state(config, unrolled_plan)[0])

  # ---- Checkpoint: restore the latest, or initialise. ----
  checkpointer = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                         keep=config.keep_checkpoints)
  init = jax.jit(lambda rng: train_step.init_train_state(config, train_plan, rng=rng)[1],
                 out_shardings=state_sharding)
  state, data_state, start_step = loop.restore_or_init(
      checkpointer, abstract_state, state_sharding,
      lambda: init(jax.random.PRNGKey(config.seed)))

  # ---- Input: this host's share of the global batch, at the restored position. ----
  data_iter = pipeline.make_train_iterator(
      plan.clips, plan.data_config, batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  if data_state is not None:
    data_iter.set_state(data_state)
  if is_primary:
    checkpoint.write_config(workdir, config)

  # ---- The loop (trainer/loop.py): DoRA's step, evaluators, pictures. ----
  job = loop.Job(
      workdir=workdir, total_steps=total_steps, log_every_steps=config.log_every_steps,
      update=update, batch_sharding=batch_sharding,
      # The update's arguments for step `step` (1-based): the schedules' values at step - 1.
      step_inputs=lambda state, batch, step: (
          state, batch, jax.device_put(schedule.at(step - 1), replicated)),
      items_per_step=config.batch_size * config.data.frames_per_clip,
      throughput_name="frames_per_second",
      checkpoint_due=lambda step: step % config.checkpoint_every_steps == 0,
      evaluation_due=lambda step: evaluator.due(step, total_steps),
      # Every process runs it, on its own devices.
      evaluate=lambda step, state: evaluator.run(train_step.teacher_backbone(graphdef, state),
                                                 step, total_steps),
      after_step=make_picture_writer(config, train_plan, graphdef, workdir, total_steps,
                                     replicated),
      unrolled=unrolled, loop_shards=mesh.size,
      peak_flops=flops_lib.device_peak(train_plan.model.compute_dtype))  # Per device, or None.
  _, last_metrics = loop.run(job, state=state, start_step=start_step, data_iter=data_iter,
                             checkpointer=checkpointer)
  return last_metrics


# ---- Helpers of the loop. ----


def make_evaluator(config: ml_collections.ConfigDict, train_plan: plan_lib.TrainPlan,
                   plan: preflight.RunPlan) -> periodic.PeriodicEvaluator:
  """The evaluators of the plan (none by default); bad settings or data: ConfigError."""
  if not train_plan.evals:
    return periodic.PeriodicEvaluator([])
  demo_tour = (paths.join(plan.workdir, preflight.DEMO_DATA_DIR) if config.data.synthetic
               else None)
  run = registry.Run(
      image_size=train_plan.image_size, frames_per_clip=int(config.data.frames_per_clip),
      frame_stride=int(config.data.frame_stride), dora=train_plan.dora, seed=int(config.seed),
      demo_tour=demo_tour)
  try:
    return periodic.PeriodicEvaluator.build(train_plan.evals, size=train_plan.model.size, run=run)
  except (ValueError, OSError) as e:
    raise preflight.ConfigError(str(e).strip().splitlines()[0]) from None


def make_picture_writer(config: ml_collections.ConfigDict, train_plan: plan_lib.TrainPlan,
                        graphdef, workdir: str, total_steps: int, replicated):
  """The loop's `after_step`: the tracking picture every `picture_every_steps` and at the last
  step, to WORKDIR/pictures/step_STEP.png and TensorBoard (None when the config draws none)."""
  if not config.picture_every_steps:
    return None
  picture_fn = jax.jit(train_step.make_visualize_fn(train_plan, graphdef),
                       out_shardings=replicated)

  def after_step(step: int, state, batch, writer: metrics_lib.MetricWriter) -> None:
    if step % config.picture_every_steps and step != total_steps:
      return
    arrays = jax.device_get(picture_fn(state, batch, jax.random.fold_in(
        jax.random.PRNGKey(config.seed), step)))
    if jax.process_index() == 0:
      write_picture(workdir, step, arrays, writer)

  return after_step


def write_picture(workdir: str, step: int, arrays: dict[str, np.ndarray],
                  writer: metrics_lib.MetricWriter) -> str:
  """WORKDIR/pictures/step_STEP.png (and TensorBoard's image) from `make_visualize_fn`'s arrays;
  its path."""
  picture = pictures.make_picture(
      arrays["frames"], arrays["heatmaps"], arrays["masked_views"], arrays.get("masks"),
      title=f"step {step}")
  paths.makedirs(paths.join(workdir, PICTURES_DIR))
  path = paths.join(workdir, PICTURES_DIR, f"step_{step:07d}.png")
  pictures.save_picture(path, picture)
  writer.write_image(step, "tracking", picture)
  return path
