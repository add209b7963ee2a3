"""Training metrics: TensorBoard event files, `metrics.jsonl` and a console progress bar.

Everything lands in the work folder:
  WORKDIR/metrics.jsonl   one JSON object per logged step: {"step": 50, "loss": ..., "lr": ...};
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
import os
import sys
from typing import Mapping

import numpy as np
import tensorboardX
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Shown beside the progress bar; tflops and mfu (model FLOPs utilisation) where known.
PROGRESS_METRICS = ("loss", "teacher_entropy", "lr", "tflops", "mfu")


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The objects of `WORKDIR/metrics.jsonl`, in order ([] when there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
  """Drops the lines of a metrics.jsonl whose step is beyond `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  if len(kept) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


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
    path = os.path.join(workdir, METRICS_FILE)
    _truncate_after(path, start_step)
    self._jsonl = open(path, "a")
    # purge_step makes TensorBoard hide the events an interrupted run wrote after step s.
    self._tensorboard = tensorboardX.SummaryWriter(
        os.path.join(workdir, TENSORBOARD_DIR),
        purge_step=start_step + 1 if start_step else None, flush_secs=30)
    self._show_progress = show_progress
    self._total_steps = total_steps

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs one step's scalars (python or numpy floats) everywhere."""
    if not self._enabled:
      return
    scalars = {name: float(np.asarray(value)) for name, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
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
    self._jsonl.close()
    self._tensorboard.close()
    if self._bar is not None:
      self._bar.close()


def _short(value: float) -> str:
  if not math.isfinite(value):
    return str(value)
  return f"{value:.4g}"
