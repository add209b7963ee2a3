"""Training metrics: TensorBoard event files, `metrics.jsonl` and a console progress bar.

Everything lands in the work folder:
  WORKDIR/metrics.jsonl   one JSON object per logged step: {"step": 50, "loss": ..., "lr": ...},
                          with the teacher's collapse indicators teacher_entropy,
                          teacher_batch_entropy and prototypes_used (`step.COLLAPSE_METRICS`);
                          the trainer adds step_time, frames_per_second, tflops and mfu (see
                          flops.py; no mfu where the device's peak is unknown), and compile_time
                          (seconds) to the first record of each start.
  WORKDIR/tensorboard/    event files (`tensorboard --logdir WORKDIR/tensorboard`)

On resume from step s, lines and events after s (written by the interrupted run after its last
checkpoint) are dropped, so that an interrupted and resumed run logs exactly what a straight run
logs.
"""
import json
import math
import sys
from typing import Mapping

import numpy as np
import tensorboardX
import tqdm

from dora_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Shown beside the progress bar; tflops and mfu (model FLOPs utilisation) where known.
PROGRESS_METRICS = ("loss", "teacher_entropy", "prototypes_used", "lr", "tflops", "mfu")


def _read_lines(path: str) -> list[str]:
  if not paths.exists(path):
    return []
  return [line + "\n" for line in paths.read_text(path).splitlines() if line.strip()]


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The objects of `WORKDIR/metrics.jsonl`, in order ([] when there is none)."""
  return [json.loads(line) for line in _read_lines(paths.join(workdir, METRICS_FILE))]


def _truncate_after(path: str, step: int) -> list[str]:
  """Drops the lines of a metrics.jsonl whose step is beyond `step` (atomically); the rest."""
  lines = _read_lines(path)
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    paths.write_text(path, "".join(kept))
  return kept


class MetricWriter:
  """Writes scalars to TensorBoard and metrics.jsonl, and drives the console progress bar.

  Only the primary process writes (`enabled=False` on the others), but every process may call it.
  """

  def __init__(self, workdir: str, *, start_step: int, total_steps: int, enabled: bool = True,
               show_progress: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    self._bar = None
    self._postfix = {}
    if not enabled:
      return
    path = paths.join(workdir, METRICS_FILE)
    kept = _truncate_after(path, start_step)
    if paths.is_remote(path):
      # Cloud objects cannot be appended to: the file is rewritten whole at each log step.
      self._remote_path, self._remote_lines = path, kept
    else:
      self._jsonl = open(path, "a")
    # purge_step makes TensorBoard hide the events an interrupted run wrote after step s.
    self._tensorboard = tensorboardX.SummaryWriter(
        paths.join(workdir, TENSORBOARD_DIR),
        purge_step=start_step + 1 if start_step else None, flush_secs=30)
    self._show_progress = show_progress
    self._total_steps = total_steps

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs one step's scalars (python or numpy floats) everywhere."""
    if not self._enabled:
      return
    scalars = {name: float(np.asarray(value)) for name, value in scalars.items()}
    line = json.dumps({"step": int(step), **scalars}) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._remote_lines.append(line)
      paths.write_text(self._remote_path, "".join(self._remote_lines))
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, global_step=step)
    shown = {name: scalars[name] for name in PROGRESS_METRICS if name in scalars}
    self._postfix = {name: _short(value) for name, value in shown.items()}
    if self._bar is not None:
      self._bar.set_postfix(self._postfix, refresh=False)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """An (H, W, 3) uint8 picture into TensorBoard."""
    if self._enabled:
      self._tensorboard.add_image(name, image, global_step=step, dataformats="HWC")

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` completed steps.

    The bar starts at the first call, after the first (compiling) step, so that its rate and ETA
    are those of the steps themselves.
    """
    if not self._enabled or not self._show_progress:
      return
    if self._bar is None:
      self._bar = tqdm.tqdm(total=self._total_steps, initial=step, unit="step",
                            dynamic_ncols=True, smoothing=0.1)
      if self._postfix:
        self._bar.set_postfix(self._postfix, refresh=False)
    self._bar.update(step - self._bar.n)

  def message(self, text: str) -> None:
    """A console line that does not break the progress bar."""
    if self._enabled:
      if self._bar is not None:
        self._bar.write(text, file=sys.stderr)
      else:
        print(text, file=sys.stderr)

  def close(self) -> None:
    if not self._enabled:
      return
    if self._jsonl is not None:
      self._jsonl.close()
    self._tensorboard.close()
    if self._bar is not None:
      self._bar.close()


def _short(value: float) -> str:
  if not math.isfinite(value):
    return str(value)
  return f"{value:.4g}"
