"""Times the jitted train step: DoRA against the DINO baseline, side by side in one process.

The DoRA step adds the teacher-side discover/refine/track/mask work and, in "keep" mode, k
student views per frame. This reports median step times (after compile) and their ratio.

  python benchmarks/train_step.py --variant=S/16 --clips=2 --frames=8 --local_crops=6 --steps=5
  python benchmarks/train_step.py --variant=S/16 --compute_dtype=bfloat16   # on an accelerator
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import config_base
from dora_jax import train_step

_VARIANT = flags.DEFINE_string("variant", "S/16", "ViT variant.")
_CLIPS = flags.DEFINE_integer("clips", 2, "Clips per step (global batch).")
_FRAMES = flags.DEFINE_integer("frames", 8, "Frames per clip (T).")
_LOCAL = flags.DEFINE_integer("local_crops", 6, "Local crops per frame (M).")
_SIZE = flags.DEFINE_integer("global_size", 224, "Global view side.")
_LOCAL_SIZE = flags.DEFINE_integer("local_size", 112, "Local crop side.")
_OUT_DIM = flags.DEFINE_integer("out_dim", 65536, "Head prototypes.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per setting (after one compile step).")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul dtype.")


def _config(dora_enabled: bool, mask_mode: str = "remove"):
  config = config_base.get_base_config()
  config.model.variant = _VARIANT.value
  config.model.out_dim = _OUT_DIM.value
  config.model.compute_dtype = _DTYPE.value
  config.batch_size = _CLIPS.value
  config.data.frames_per_clip = _FRAMES.value
  config.data.num_local_crops = _LOCAL.value
  config.data.global_size = _SIZE.value
  config.data.local_size = _LOCAL_SIZE.value
  config.dora.enabled = dora_enabled
  config.dora.mask_mode = mask_mode
  return config


def _time(config, batch) -> tuple[float, float]:
  """(compile seconds, median seconds per step)."""
  graphdef, state = train_step.init_train_state(config, rng=jax.random.PRNGKey(0),
                                                steps_per_epoch=100, total_steps=1000)
  step = jax.jit(train_step.make_train_step(config, graphdef, steps_per_epoch=100,
                                            total_steps=1000), donate_argnums=0)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return compile_seconds, statistics.median(times)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  b, t, m = _CLIPS.value, _FRAMES.value, _LOCAL.value
  batch = {
      "frames": jnp.asarray(rng.integers(0, 256, (b, t, _SIZE.value, _SIZE.value, 3)), jnp.uint8),
      "crops": jnp.asarray(
          rng.integers(0, 256, (b, t, m, _LOCAL_SIZE.value, _LOCAL_SIZE.value, 3)), jnp.uint8),
  }
  device = jax.devices()[0]
  print(f"device: {device.device_kind} x{jax.device_count()}  variant {_VARIANT.value}  "
        f"clips {b} x T={t} x M={m}  dtype {_DTYPE.value}")
  rows = []
  for name, config in (("dino", _config(False)), ("dora remove", _config(True)),
                       ("dora keep", _config(True, "keep"))):
    compile_seconds, seconds = _time(config, batch)
    rows.append((name, compile_seconds, seconds))
  base = rows[0][2]
  print(f"{'step':<12} {'compile s':>9} {'median s/step':>13} {'frames/s':>9} {'vs dino':>8}")
  for name, compile_seconds, seconds in rows:
    print(f"{name:<12} {compile_seconds:9.1f} {seconds:13.3f} {b * t / seconds:9.1f} "
          f"{seconds / base:8.2f}")


if __name__ == "__main__":
  app.run(main)
