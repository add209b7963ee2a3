"""The loop that dora-train and dora-finetune share: step, log, evaluate, save, until the end.

A program builds its state, its jitted update, its input and its evaluation, and hands them to
`run` as a `Job`; everything around the step is this module's, the same for both programs:

  restore    `restore_or_init`: the newest intact checkpoint (each array verified against its
             checksum, a damaged newer one set aside) or a fresh state.
  compile    the update compiled once, timed (`compile_time` in the first record of each start),
             with its FLOPs; the step timer starts after it.
  log        every `log_every_steps` and at the last step one record: the step's metrics, the
             timing (`step_time`, the throughput, `tflops`, `mfu`) and the evaluation's scores
             when it ran at that step (otherwise they get a record of their own). Evaluations are
             not counted as step time.
  finite     the metrics are fetched at log and save steps; a non-finite loss or state stops the
             run (`NonFiniteLossError`) before that state is saved, keeping the last good
             checkpoint.
  save       when the job says, at the last step, and on SIGTERM or Ctrl-C (`Preemption`: at a
             step boundary; on several processes all of them agree on the step), which saves
             and returns.
  close      saves in flight finish, then the checkpointer, the signal handler, the metric writer
             and the input workers are closed, also when the run fails.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import checkpoint
from dora_jax.trainer import compilation
from dora_jax.trainer import flops as flops_lib
from dora_jax.trainer import metrics as metrics_lib
from dora_jax.trainer import sharding as sharding_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


def _never(step: int) -> bool:
  del step
  return False


@dataclasses.dataclass(frozen=True)
class Job:
  """What differs between the programs: their update, input, evaluation and save policy.

  Attributes:
    workdir: the run's work folder (local path or URL).
    total_steps: the run's length in updates.
    log_every_steps: a metrics record every n steps (and at the last).
    update: the jitted update `(state, *inputs) -> (state, metrics)`; metrics hold scalars, among
      them `loss` and `finite` (`with_finite_check`).
    step_inputs: `(state, batch, step) -> inputs` of the update for step `step` (1-based): the
      one place where the update's arguments are made.
    batch_sharding: where `global_batch` puts each host's batch.
    items_per_step: frames or images per global batch, for the throughput.
    throughput_name: the throughput's metric name (`frames_per_second`, `images_per_second`).
    checkpoint_due: `step -> bool`: save after this step (the last step and SIGTERM always save).
    evaluation_due: `step -> bool`: evaluate after this step.
    evaluate: `(step, state) -> scores` (dict of floats), run on every process.
    after_step: `(step, state, batch, writer) -> None`, after each step's record, before its save
      (pictures).
    unrolled: the update without loops, jitted alike, for its FLOPs only (`compile_step`).
    loop_shards: the devices that share the loops' trips (`compile_step`).
    peak_flops: a device's peak FLOP/s (None: unknown, no `mfu`).
  """
  workdir: str
  total_steps: int
  log_every_steps: int
  update: Any
  step_inputs: Callable[[Any, Any, int], tuple]
  batch_sharding: Any
  items_per_step: int
  throughput_name: str
  checkpoint_due: Callable[[int], bool]
  evaluation_due: Callable[[int], bool] = _never
  evaluate: Callable[[int, Any], dict[str, float]] | None = None
  after_step: Callable[[int, Any, Any, metrics_lib.MetricWriter], None] | None = None
  unrolled: Any = None
  loop_shards: int = 1
  peak_flops: float | None = None


def with_finite_check(step_fn: Callable, trained: Callable[[Any], Any]) -> Callable:
  """Adds metric `finite`: the loss and every updated parameter (`trained(new_state)`) are finite.

  Checked inside the jitted step (one pass over the parameters), so that a state that has just
  gone NaN is never saved, even when the loss computed from it is not known yet.
  """

  def step(state, *inputs):
    new_state, metrics = step_fn(state, *inputs)
    finite = jnp.isfinite(metrics["loss"])
    for leaf in jax.tree.leaves(trained(new_state)):
      finite &= jnp.all(jnp.isfinite(leaf))
    return new_state, dict(metrics, finite=finite)

  return step


def restore_or_init(checkpointer: checkpoint.Checkpointer, abstract_state: Any,
                    state_sharding: Any, initialise: Callable[[], Any]
                    ) -> tuple[Any, dict | None, int]:
  """(state, data-iterator state or None, start step): the newest intact checkpoint, or
  `initialise()` (a fresh state with `state_sharding`) when there is none.

  Raises:
    checkpoint.CheckpointMismatchError, checkpoint.CheckpointDamagedError: as
      `Checkpointer.restore_latest`.
  """
  restored = checkpointer.restore_latest(
      sharding_lib.with_shardings(abstract_state, state_sharding))
  state, data_state = restored if restored is not None else (initialise(), None)
  return state, data_state, int(jax.device_get(state["step"]))


class Preemption:
  """SIGTERM (a preempted VM, `scancel`) or Ctrl-C asks the loop to save and stop.

  Both are handled at a step boundary, so that the signal never lands inside a save (an orbax
  save cut by a KeyboardInterrupt could leave its commit thread waited on forever); after a
  Ctrl-C the loop saves, closes everything and raises KeyboardInterrupt (exit 130). A second
  Ctrl-C stops at once. With several processes jax's preemption service, which handles SIGTERM
  itself, makes the hosts agree on the step at which all of them save; Ctrl-C keeps Python's
  default there.
  """

  def __init__(self, checkpointer: checkpoint.Checkpointer):
    self._checkpointer = checkpointer
    self._requested = False
    self.interrupted = False  # Ctrl-C asked for the stop.
    self._previous = {}
    if jax.process_count() == 1:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def _handle_interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      raise KeyboardInterrupt
    self.interrupted = self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._requested
    return self._checkpointer.reached_preemption(step)

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _first_non_finite(history: list[tuple[int, dict]]) -> tuple[int, dict] | None:
  for step, metrics in history:
    if not metrics["finite"]:
      return step, metrics
  return None


def _non_finite_error(bad: tuple[int, dict],
                      checkpointer: checkpoint.Checkpointer) -> NonFiniteLossError:
  bad_step, bad_metrics = bad
  what = (f"the loss is {float(bad_metrics['loss'])}" if not np.isfinite(bad_metrics["loss"])
          else "the parameters are not finite")
  checkpointer.wait_until_finished()
  last_good = checkpointer.latest_step()
  return NonFiniteLossError(
      f"{what} at step {bad_step}: stopping. " + (
          f"The last good checkpoint is step {last_good} in {checkpointer.directory}"
          if last_good is not None else "No checkpoint was saved before it, so the next run "
          "starts from scratch") + "; change the config (e.g. a lower --config.optim.base_lr) "
      "and run again.")


def run(job: Job, *, state: Any, start_step: int, data_iter: Any,
        checkpointer: checkpoint.Checkpointer) -> tuple[Any, dict[str, float]]:
  """Runs `job` from `start_step` to its end, or to SIGTERM or Ctrl-C (both save the step they
  reach; Ctrl-C then raises KeyboardInterrupt); returns (state, last record).

  Takes over `data_iter` (at its restored position) and `checkpointer`: both are closed when it
  returns or raises.

  Raises:
    KeyboardInterrupt: after Ctrl-C, once the step it reached is saved and everything closed.
    NonFiniteLossError: the loss or the state became NaN/inf (the last good checkpoint is kept).
    checkpoint.CheckpointSaveError: a save failed (e.g. a full disk); older checkpoints stay.
  """
  total_steps = job.total_steps
  is_primary = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(job.workdir, start_step=start_step, total_steps=total_steps,
                                    enabled=is_primary)
  preemption = Preemption(checkpointer)
  history = []  # (step, metrics on the device) since the last fetch; fetched in one go.
  last_metrics = {}
  timer_start, timer_steps = None, 0
  compiled, once = None, {}  # The compiled step; what the next record carries once per start.
  if start_step >= total_steps:
    logging.info("The run in %s is complete (%d of %d steps).", job.workdir, start_step,
                 total_steps)
  else:
    logging.info("Compiling the train step (the first step takes a while).")
  stopped_early = False
  try:
    for step in range(start_step + 1, total_steps + 1):  # `step` updates done after this one.
      batch = sharding_lib.global_batch(next(data_iter), job.batch_sharding)
      inputs = job.step_inputs(state, batch, step)
      if compiled is None:  # Compiled (or loaded from the cache) once, timed, with its FLOPs.
        compiled = compilation.compile_step(job.update, *inputs, unrolled=job.unrolled,
                                            loop_shards=job.loop_shards)
        once["compile_time"] = compiled.compile_seconds
        timer_start = time.perf_counter()
      state, step_metrics = compiled.executable(*inputs)
      history.append((step, step_metrics))
      timer_steps += 1

      stop = preemption.reached(step)
      is_last = step == total_steps
      log_now = step % job.log_every_steps == 0 or is_last
      save_now = job.checkpoint_due(step) or is_last or stop
      scores = {}
      if job.evaluate is not None and job.evaluation_due(step):
        evaluation_start = time.perf_counter()
        scores = job.evaluate(step, state)
        timer_start += time.perf_counter() - evaluation_start  # Not train-step time.
        writer.message(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
      if log_now or save_now:
        fetched = jax.device_get(history)
        history = []
        bad = _first_non_finite(fetched)
        if bad is not None:
          raise _non_finite_error(bad, checkpointer)
        if log_now:
          last_metrics = {name: float(value) for name, value in fetched[-1][1].items()
                          if name != "finite"}
          last_metrics.update(once)
          once = {}
          elapsed = time.perf_counter() - timer_start
          if timer_steps:
            last_metrics["step_time"] = elapsed / timer_steps
            last_metrics[job.throughput_name] = job.items_per_step * timer_steps / elapsed
            last_metrics.update(flops_lib.rates(compiled.flops, elapsed / timer_steps,
                                                job.peak_flops))
          last_metrics.update(scores)  # The evaluation's numbers join the step's record.
          writer.write_scalars(step, last_metrics)
          timer_start, timer_steps = time.perf_counter(), 0
      if job.after_step is not None:
        job.after_step(step, state, batch, writer)
      if scores and not log_now:
        writer.write_scalars(step, scores)
      if save_now:
        checkpointer.save(step, state, data_iter.get_state())
      writer.advance(step)
      if stop and not is_last:
        signal_name = "Ctrl-C" if preemption.interrupted else "SIGTERM"
        writer.message(f"{signal_name}: saved step {step} to {checkpointer.directory}; run the "
                       "same command again to resume.")
        stopped_early = True
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
  if stopped_early and preemption.interrupted:
    raise KeyboardInterrupt  # Saved and closed: the command line exits 130.
  return state, last_metrics
