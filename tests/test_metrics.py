"""metrics.jsonl, TensorBoard and the resume truncation."""
import os

import numpy as np

from dora_jax.trainer import metrics


def test_metric_writer_jsonl_tensorboard_and_resume_truncation(tmp_path):
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir, start_step=0, total_steps=6, show_progress=False)
  for step in range(1, 6):
    writer.write_scalars(step, {"loss": np.float32(1.0 / step), "lr": 0.5})
  writer.close()
  rows = metrics.read_metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
  assert rows[1] == {"step": 2, "loss": float(np.float32(0.5)), "lr": 0.5}
  assert any(name.startswith("events.out.tfevents")
             for name in os.listdir(tmp_path / metrics.TENSORBOARD_DIR))

  # A run resumed from the checkpoint at step 3 forgets what was logged after it.
  writer = metrics.MetricWriter(workdir, start_step=3, total_steps=6, show_progress=False)
  writer.write_scalars(4, {"loss": 9.0, "lr": 0.5})
  writer.close()
  rows = metrics.read_metrics(workdir)
  assert [(row["step"], row["loss"]) for row in rows][-2:] == [(3, float(np.float32(1 / 3))),
                                                              (4, 9.0)]
  assert len(rows) == 4


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), start_step=0, total_steps=2, enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []
