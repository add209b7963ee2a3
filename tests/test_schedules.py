"""The recipe's schedules: warm-ups, cosine ends, the teacher-temperature epochs."""
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
