r"""Memory per device of the train step with and without FSDP, from XLA's compiled memory analysis.

  python benchmarks/fsdp_memory.py [--variant B/16] [--devices 8] [--clips_per_device 1]

Fakes `--devices` CPU devices, builds the state's shapes (nothing is allocated), compiles the
jitted DoRA step for meshes (data=N, fsdp=1), (data=N/2, fsdp=2) and (data=1, fsdp=N), and prints,
per device, the bytes of the arguments (state + batch), outputs and temporaries XLA plans. The
state (student, teacher, Adam moments) is what FSDP splits; activations stay per device.
"""
import argparse
import os
import sys

_PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_PARSER.add_argument("--variant", default="B/16")
_PARSER.add_argument("--devices", type=int, default=8)
_PARSER.add_argument("--clips_per_device", type=int, default=1)
_PARSER.add_argument("--frames", type=int, default=2)
_PARSER.add_argument("--local_crops", type=int, default=2)
ARGS = _PARSER.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={ARGS.devices}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dora_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules  # pylint: disable=g-import-not-at-top,wrong-import-position
from dora_jax.trainer import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from dora_jax.trainer import step as train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  config = config_base.get_base_config()
  config.model.variant = ARGS.variant
  config.batch_size = ARGS.clips_per_device * ARGS.devices
  config.data.frames_per_clip = ARGS.frames
  config.data.num_local_crops = ARGS.local_crops
  plan = plan_lib.TrainPlan.from_config(config)
  graphdef, abstract = train_step.abstract_train_state(config, plan)
  schedule = schedules.make_schedules(config, steps_per_epoch=100, total_steps=1000).at(0)
  size, crop = config.data.global_size, config.data.local_size
  batch_shape = (config.batch_size, ARGS.frames)
  abstract_batch = {
      "frames": jax.ShapeDtypeStruct(batch_shape + (size, size, 3), "uint8"),
      "crops": jax.ShapeDtypeStruct(batch_shape + (ARGS.local_crops, crop, crop, 3), "uint8"),
  }
  print(f"ViT-{ARGS.variant}, {ARGS.devices} devices, {ARGS.clips_per_device} clip(s) of "
        f"{ARGS.frames} frames per device, {ARGS.local_crops} local crops, out_dim "
        f"{config.model.out_dim}")
  print("| mesh (data x fsdp) | arguments MiB | outputs MiB | temporaries MiB |")
  print("|---|---|---|---|")
  for fsdp in (1, 2, ARGS.devices):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        {"data": ARGS.devices // fsdp, "fsdp": fsdp}))
    state_sharding = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    step = jax.jit(train_step.make_train_step(config, plan, graphdef),
                   in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                                 sharding.replicated(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)
    memory = step.lower(abstract, abstract_batch, schedule).compile().memory_analysis()
    mib = lambda b: f"{b / 2**20:.0f}"
    print(f"| {ARGS.devices // fsdp} x {fsdp} | {mib(memory.argument_size_in_bytes)} | "
          f"{mib(memory.output_size_in_bytes)} | {mib(memory.temp_size_in_bytes)} |", flush=True)


if __name__ == "__main__":
  main()
