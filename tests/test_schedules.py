"""The recipe's schedules: warm-ups, cosine ends, the teacher-temperature epochs; the host's
values equal those the step computed inside before issue 18."""
import os

import numpy as np
import pytest

from dora_jax import config_base
from dora_jax.trainer import schedules


def test_schedules_follow_the_recipe():
  config = config_base.get_base_config()
  config.batch_size = 512
  schedule = schedules.make_schedules(config, steps_per_epoch=10, total_steps=1000)
  peak = 5e-4 * 512 / 256
  assert float(schedule.learning_rate(0)) == 0.0
  np.testing.assert_allclose(float(schedule.learning_rate(100)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(schedule.learning_rate(1000)), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(schedule.weight_decay(0)), 0.04, rtol=1e-6)
  np.testing.assert_allclose(float(schedule.weight_decay(1000)), 0.4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule.teacher_momentum(0)), 0.996, rtol=1e-6)
  np.testing.assert_allclose(float(schedule.teacher_momentum(1000)), 1.0, rtol=1e-6)
  assert float(schedule.teacher_temp(0)) == pytest.approx(0.04)
  config.loss.warmup_teacher_temp = 0.02
  config.loss.teacher_temp = 0.07
  schedule = schedules.make_schedules(config, steps_per_epoch=10, total_steps=1000)
  assert float(schedule.teacher_temp(5)) == pytest.approx(0.02)  # epoch 0
  assert float(schedule.teacher_temp(290)) == pytest.approx(0.07)  # epoch 29 = warm-up end
  assert float(schedule.teacher_temp(999)) == pytest.approx(0.07)


def test_host_values_equal_those_the_step_computed_inside_before():
  """The values the compiled step computed from its step count before issue 18 (its metrics,
  saved in tests/data for test_train_step.reference_config) equal `Schedules.at` on the host, bit
  for bit: moving them out of the step changed no number of a run."""
  saved = np.load(os.path.join(os.path.dirname(__file__), "data",
                               "train_step_before_issue18.npz"))
  config = config_base.get_base_config()
  config.batch_size = 2
  config.optim.base_lr = 0.05
  config.optim.warmup_epochs = 1
  config.optim.freeze_last_layer_epochs = 1
  config.loss.warmup_teacher_temp_epochs = 3
  config.loss.teacher_temp = 0.07
  schedule = schedules.make_schedules(config, steps_per_epoch=3, total_steps=12)
  inputs = [schedule.at(step) for step in range(len(saved["metrics/lr"]))]
  for name in schedules.SCALARS:
    values = np.array([step_inputs[name] for step_inputs in inputs])
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, saved[f"metrics/{name}"], err_msg=name)
  assert [bool(i["last_layer_frozen"]) for i in inputs] == [True] * 3 + [False] * 5


def test_a_longer_run_changes_only_the_values():
  """Extending a run changes the inputs' values, never their shapes or dtypes (one program)."""
  config = config_base.get_base_config()
  short = schedules.make_schedules(config, steps_per_epoch=10, total_steps=100).at(50)
  long = schedules.make_schedules(config, steps_per_epoch=10, total_steps=200).at(50)
  assert [(k, np.shape(v), np.asarray(v).dtype) for k, v in short.items()] == [
      (k, np.shape(v), np.asarray(v).dtype) for k, v in long.items()]
  assert float(long["weight_decay"]) < float(short["weight_decay"])
