"""FLOPs of a compiled program, the peak table, MFU, and the timed compile through the cache."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.trainer import compilation
from dora_jax.trainer import flops
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules


def test_compiled_flops_of_a_matmul_is_2mkn():
  m, k, n = 48, 40, 24
  compiled = jax.jit(lambda a, b: a @ b).lower(
      jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)).compile()
  assert flops.compiled_flops(compiled) == 2 * m * k * n


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("TPU v4", jnp.bfloat16, 275), ("TPU v5 lite", jnp.bfloat16, 197), ("TPU v5", "bfloat16", 459),
    ("TPU v5p", jnp.float32, 459), ("TPU v6 lite", jnp.bfloat16, 918),
    ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, 312), ("NVIDIA A100 80GB PCIe", "float32", 156),
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989), ("NVIDIA H100 PCIe", jnp.bfloat16, 756),
    ("NVIDIA H100 NVL", jnp.float32, 418), ("NVIDIA H200", jnp.bfloat16, 989),
    ("NVIDIA H200", jnp.float32, 494.5), ("NVIDIA H200 NVL", jnp.bfloat16, 835),
    ("NVIDIA H1000", jnp.bfloat16, None), ("cpu", jnp.float32, None), ("TPU v7x", jnp.bfloat16, None),
])
def test_peak_table(kind, dtype, tflops):
  peak = flops.table_peak(kind, dtype)
  assert peak == (None if tflops is None else tflops * 1e12)


def test_cpu_peak_is_measured_and_rates():
  measured = flops.measure_matmul_peak(jnp.float32, size=256, repeats=2)
  assert 1e8 < measured < 1e14  # Between 0.1 GFLOP/s and 100 TFLOP/s.
  assert flops.device_peak(jnp.float32) > 0  # The CPU's (measured) peak per fake device.
  assert flops.rates(2e12, 4.0, 1e12) == {"tflops": 0.5, "mfu": 0.5}
  assert flops.rates(2e12, 4.0, None) == {"tflops": 0.5}  # Unknown peak: no mfu.
  assert flops.rates(None, 4.0, 1e12) == {}


def test_compile_step_times_counts_and_fills_the_cache(tmp_path):
  before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    assert compilation.cache_folder("none", str(tmp_path)) is None
    assert compilation.cache_folder("~/x", "w") == os.path.expanduser("~/x")
    folder = compilation.enable_cache("", str(tmp_path))
    if before[0] is None:  # Not given by the environment: the work folder's.
      assert folder == str(tmp_path / compilation.CACHE_SUBDIR)
    folder = compilation.enable_cache(str(tmp_path / "cache"), str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    x = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    step = compilation.compile_step(jax.jit(lambda x: jnp.tanh(x.T @ x * 0.1234)), x)
    # The dot's 2 m k n, one per element for the scaling, none for tanh (a transcendental).
    assert step.compile_seconds > step.lower_seconds > 0
    assert step.flops == 2 * 16 * 32 * 16 + 16 * 16
    np.testing.assert_allclose(step.executable(jnp.ones((32, 16))), np.tanh(32 * 0.1234),
                               rtol=1e-6)
    assert os.listdir(folder)  # The compiled program was written to the cache.
    assert compilation.enable_cache("none", str(tmp_path)) is None
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.experimental.compilation_cache.compilation_cache.reset_cache()


def test_flops_of_a_scanned_step_are_those_of_the_unrolled_step(tiny_config):
  """XLA counts a scan's body once; the unrolled twin's lowering restores the other trips, on a
  batch sharded over the 4 fake devices (XLA's counts are per device). Width 128: the blocks'
  matmuls dominate, as in real models (at width 32 the replicated per-trip work, e.g. the
  scanned parameters' gradient sums, is ~5% of the count and the estimate ~5% short)."""
  from dora_jax.trainer import sharding  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import step as train_step  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(tiny_config().mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  batch = {"frames": jax.device_put(rng.integers(0, 256, (4, 2, 32, 32, 3), np.uint8),
                                    batch_sharding),
           "crops": jax.device_put(rng.integers(0, 256, (4, 2, 2, 16, 16, 3), np.uint8),
                                   batch_sharding)}

  def jitted(scan):
    config = tiny_config(**{"model.depth": 5, "model.scan": scan, "model.dim": 128})
    plan = plan_lib.TrainPlan.from_config(config)
    graphdef, state = train_step.abstract_train_state(config, plan)
    return jax.jit(train_step.make_train_step(config, plan, graphdef),
                   in_shardings=(sharding.replicated(mesh), batch_sharding,
                                 sharding.replicated(mesh))), state

  (scanned, state), (unrolled, _) = jitted(True), jitted(False)
  schedule = schedules.make_schedules(tiny_config(), steps_per_epoch=10, total_steps=100).at(0)
  truth = compilation.compile_step(unrolled, state, batch, schedule).flops
  looped = compilation.compile_step(scanned, state, batch, schedule).flops
  corrected = compilation.compile_step(scanned, state, batch, schedule, unrolled=unrolled,
                                       loop_shards=4).flops
  assert looped < 0.75 * truth  # 4 scanned blocks counted as one.
  np.testing.assert_allclose(corrected, truth, rtol=0.02)
