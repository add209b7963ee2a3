r"""XLA's compiled memory of the train step, without running it: model.remat (and model.scan)
on and off.

  python benchmarks/step_memory.py --variant=B/16 --clips=4 --frames=2 --local_crops=6

Compiles the step of each setting (no steps run) and prints `compiled.memory_analysis()`:
arguments (the train state and the batch), outputs, temporaries (activations kept for the
backward pass and scratch) and the total arguments + outputs + temporaries - donated aliases.
"""
from absl import app
from absl import flags
import jax

from dora_jax import config_base
from dora_jax.trainer import compilation
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules
from dora_jax.trainer import step as train_step

_VARIANT = flags.DEFINE_string("variant", "B/16", "ViT variant.")
_CLIPS = flags.DEFINE_integer("clips", 4, "Clips per step.")
_FRAMES = flags.DEFINE_integer("frames", 2, "Frames per clip (T).")
_LOCAL = flags.DEFINE_integer("local_crops", 6, "Local crops per frame (M).")
_DORA = flags.DEFINE_bool("dora", False, "DoRA (mask_mode keep) instead of DINO.")
_OPTIONS = flags.DEFINE_list("options", "plain,remat", "Rows: plain, remat, scan, remat+scan.")


def main(argv):
  del argv
  gib = lambda n: n / 2**30
  print(f"{_VARIANT.value}, {_CLIPS.value} clips x T={_FRAMES.value}, M={_LOCAL.value}, "
        f"{'DoRA keep' if _DORA.value else 'DINO'}, float32, {jax.devices()[0].device_kind}")
  print(f"{'option':<12} {'compile s':>9} {'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} "
        f"{'total GiB':>9}")
  for option in _OPTIONS.value:
    config = config_base.get_base_config()
    config.model.variant = _VARIANT.value
    config.model.remat = "full" if "remat" in option else "none"
    config.model.scan = "scan" in option
    config.batch_size = _CLIPS.value
    config.data.frames_per_clip = _FRAMES.value
    config.data.num_local_crops = _LOCAL.value
    config.dora.enabled = _DORA.value
    config.dora.mask_mode = "keep"
    plan = plan_lib.TrainPlan.from_config(config)
    graphdef, state = train_step.abstract_train_state(config, plan)
    size, small = config.data.global_size, config.data.local_size
    batch = {
        "frames": jax.ShapeDtypeStruct((_CLIPS.value, _FRAMES.value, size, size, 3), "uint8"),
        "crops": jax.ShapeDtypeStruct(
            (_CLIPS.value, _FRAMES.value, _LOCAL.value, small, small, 3), "uint8"),
    }
    step = jax.jit(train_step.make_train_step(config, plan, graphdef), donate_argnums=0)
    schedule = schedules.make_schedules(config, steps_per_epoch=100, total_steps=1000).at(0)
    compiled = compilation.compile_step(step, state, batch, schedule)
    stats = compiled.executable.memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    print(f"{option:<12} {compiled.compile_seconds:9.1f} {gib(stats.argument_size_in_bytes):9.2f} "
          f"{gib(stats.output_size_in_bytes):8.2f} {gib(stats.temp_size_in_bytes):9.2f} "
          f"{gib(total):9.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
