r"""Times the jitted train step: settings side by side in one process, interleaved.

  python benchmarks/train_step.py --preset=reference-cpu            # issue 9's CPU configuration
  python benchmarks/train_step.py --preset=reference-cpu --head=scaled,fused   # before/after
  python benchmarks/train_step.py --preset=reference-cpu --breakdown           # where it goes
  python benchmarks/train_step.py --preset=paper-device             # on a GPU/TPU (accelerator.sh)
  python benchmarks/train_step.py --variant=B/16 --clips=1 --remat=none,full --settings=dino

Each row is one setting (DoRA keep / remove, DINO) with one head formula and one remat/scan
choice, compiled once (through `compilation.compile_step`, which also gives XLA's FLOPs of the
step) and then run `--steps` times, the rows taking turns step by step, so that all of them see
the same load on a shared machine. It reports median seconds per step, frames/s, TFLOP/s and MFU
(XLA's FLOPs of the compiled step per device over the device's peak, `dora_jax.trainer.flops`), XLA's
compiled memory (arguments + temporaries, `compiled.memory_analysis()`) and, on accelerators, the
device's peak bytes in use. The last line is `frames/s: X` of the first row.

--head=fused is the head's first formula, x @ (g v / ||v||), patched in for a before/after
comparison (dora_jax/models/head.py now computes (x v) (g / ||v||), the same numbers);
--head=per_group calls the head once per image size (the student's views, then its crops), as
before `DinoModel.multi_crop` gave them one call. --torch adds a PyTorch twin of the DoRA keep
step (benchmarks/torch_reference.py) as one more row.

--breakdown times the parts of the first setting's step as separate jitted functions (teacher
forward, objects, student forward+backward on the views and the crops, the loss, the optimiser,
the EMA), interleaved the same way, beside the whole step; the parts overlap nothing on the CPU,
so their sum should be close to the step.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dora_jax import config_base
from dora_jax import losses
from dora_jax.models import dino
from dora_jax.models import head as head_lib
from dora_jax.models import vit
from dora_jax import objects
from dora_jax.trainer import compilation
from dora_jax.trainer import flops as flops_lib
from dora_jax.trainer import optim
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import schedules
from dora_jax.trainer import step as train_step

PRESETS = {
    # Issue 9's measurement on the 2-core VM, beside the public PyTorch code (0.74 frames/s).
    "reference-cpu": dict(variant="S/16", clips=1, frames=2, local_crops=6, global_size=224,
                          local_size=112, out_dim=65536, compute_dtype="float32",
                          settings="dora_keep", steps=5),
    # The paper's per-device batch (16 clips of 8 frames), DoRA and DINO, bfloat16.
    "paper-device": dict(variant="S/16", clips=16, frames=8, local_crops=6, global_size=224,
                         local_size=112, out_dim=65536, compute_dtype="bfloat16",
                         settings="dora,dino", steps=5),
}
SETTINGS = ("dora", "dora_keep", "dora_remove", "dino")

_PRESET = flags.DEFINE_enum("preset", None, list(PRESETS), "Sets the flags not given explicitly.")
_VARIANT = flags.DEFINE_string("variant", "S/16", "ViT variant.")
_CLIPS = flags.DEFINE_integer("clips", 2, "Clips per step (the global batch).")
_FRAMES = flags.DEFINE_integer("frames", 8, "Frames per clip (T).")
_LOCAL = flags.DEFINE_integer("local_crops", 6, "Local crops per frame (M).")
_SIZE = flags.DEFINE_integer("global_size", 224, "Global view side.")
_LOCAL_SIZE = flags.DEFINE_integer("local_size", 112, "Local crop side.")
_OUT_DIM = flags.DEFINE_integer("out_dim", 65536, "Head prototypes.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Matmul dtype.")
_SETTINGS = flags.DEFINE_list(
    "settings", "dino,dora_remove,dora_keep",
    f"Steps to time, of {SETTINGS} (dora: the base config's mask mode).")
_HEAD = flags.DEFINE_list(
    "head", "scaled", "Head formulas: scaled (the code's), fused (the first formula), per_group "
    "(the code's formula, a head call per image size).")
_REMAT = flags.DEFINE_list("remat", "", "model.remat values to time (none, dots, full); empty: "
                           "the config's default.")
_SCAN = flags.DEFINE_list("scan", "true", "model.scan values to time (true/false).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row (after one untimed step).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also time the parts of the first setting.")
_TORCH = flags.DEFINE_bool(
    "torch", False, "Also time a PyTorch twin of the DoRA keep step (benchmarks/torch_reference.py;"
    " needs torch), interleaved with the rows.")
_SIZES = flags.DEFINE_string(
    "model_sizes", "", "Tiny models for dry runs: 'dim,depth,heads,patch' (overrides variant).")


def _apply_preset() -> None:
  if _PRESET.value is None:
    return
  for name, value in PRESETS[_PRESET.value].items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].parse(value)


def _config(setting: str, remat: str | None, scan: bool):
  config = config_base.get_base_config()
  config.model.variant = _VARIANT.value
  if _SIZES.value:
    dim, depth, heads, patch = (int(v) for v in _SIZES.value.split(","))
    config.model.update(dim=dim, depth=depth, num_heads=heads, patch_size=patch,
                        head_hidden_dim=4 * dim, head_bottleneck_dim=dim)
    config.dora.num_objects = min(config.dora.num_objects, heads)
  config.model.out_dim = _OUT_DIM.value
  config.model.compute_dtype = _DTYPE.value
  if remat is not None:
    config.model.remat = vit.remat_policy(remat)
  if "scan" in config.model:
    config.model.scan = scan
  elif scan:
    raise ValueError("this checkout has no config.model.scan")
  config.batch_size = _CLIPS.value
  config.data.frames_per_clip = _FRAMES.value
  config.data.num_local_crops = _LOCAL.value
  config.data.global_size = _SIZE.value
  config.data.local_size = _LOCAL_SIZE.value
  config.dora.enabled = setting != "dino"
  if setting in ("dora_keep", "dora_remove"):
    config.dora.mask_mode = setting.split("_")[1]
  return config


def _fused_call(self, x):
  """DINOHead.__call__ as first written: the weight normalised before the matmul."""
  for i, layer in enumerate(self.mlp):
    x = layer(x)
    if i < len(self.mlp) - 1:
      x = jax.nn.gelu(x, approximate=False)
  x = x.astype(jnp.float32)
  x = x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), head_lib.NORMALIZE_EPS)
  logits = jnp.dot(x.astype(self.dtype), self.last_layer_weight().astype(self.dtype),
                   preferred_element_type=jnp.float32)
  return logits.astype(jnp.float32)


def _per_group(self, groups, drop_path_rngs):
  """DinoModel.multi_crop as first written: a head call per group of images."""
  return [self(images, drop_path_rng=rng)[0] for images, rng in zip(groups, drop_path_rngs)]


@contextlib.contextmanager
def _head_formula(name: str):
  """Patches the head while tracing: --head=fused, the first formula; --head=per_group, one head
  call per image size (before the student's views and crops shared one)."""
  if name == "scaled":
    yield
    return
  patches = {"fused": (head_lib.DINOHead, "__call__", _fused_call),
             "per_group": (dino.DinoModel, "multi_crop", _per_group)}
  if name not in patches:
    raise ValueError(f"--head: unknown formula {name!r}; expected scaled, fused or per_group.")
  owner, attribute, replacement = patches[name]
  original = getattr(owner, attribute)
  setattr(owner, attribute, replacement)
  try:
    yield
  finally:
    setattr(owner, attribute, original)


def _memory(compiled) -> float | None:
  """GiB of arguments + temporaries (- donated aliases) from XLA's compiled memory analysis."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend has it.
    return None
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return total / 2**30


class Row:
  """One compiled step with its own state, stepped on demand."""

  def __init__(self, name: str, config, batch, head: str):
    self.name, self.batch = name, batch
    plan = plan_lib.TrainPlan.from_config(config)
    graphdef, self.state = train_step.init_train_state(config, plan, rng=jax.random.PRNGKey(0))
    # The inputs of a step past the warm-up (the values do not change the step's time).
    self.schedule = schedules.make_schedules(config, steps_per_epoch=100,
                                             total_steps=1000).at(500)
    with _head_formula(head):
      step = jax.jit(train_step.make_train_step(config, plan, graphdef), donate_argnums=0)
      unrolled = None  # XLA counts a scan's body once: the FLOPs come from the unrolled twin.
      unrolled_plan = plan.unrolled()
      if unrolled_plan is not None:
        unrolled = jax.jit(train_step.make_train_step(
            config, unrolled_plan, train_step.abstract_train_state(config, unrolled_plan)[0]),
            donate_argnums=0)
      compiled = compilation.compile_step(step, self.state, batch, self.schedule,
                                          unrolled=unrolled)
    self.executable, self.compile_seconds = compiled.executable, compiled.compile_seconds
    self.flops = compiled.flops
    self.memory = _memory(compiled.executable)
    self.times = []
    self.step(timed=False)  # The first run allocates; not timed.

  def step(self, timed: bool = True) -> None:
    start = time.perf_counter()
    self.state, metrics = self.executable(self.state, self.batch, self.schedule)
    jax.block_until_ready(metrics)
    if timed:
      self.times.append(time.perf_counter() - start)


class Part:
  """One jitted function of fixed arguments, for the breakdown."""

  def __init__(self, name: str, fn, *args):
    self.name, self.args = name, args
    self.compiled = jax.jit(fn).lower(*args).compile()
    self.flops = flops_lib.compiled_flops(self.compiled)
    self.times = []
    jax.block_until_ready(self.compiled(*args))

  def step(self, timed: bool = True) -> None:
    start = time.perf_counter()
    jax.block_until_ready(self.compiled(*self.args))
    if timed:
      self.times.append(time.perf_counter() - start)


def _parts(config, batch) -> list[Part]:
  """The step of `config` cut into separately jitted parts on the same inputs."""
  plan = plan_lib.TrainPlan.from_config(config)
  graphdef, state = train_step.init_train_state(config, plan, rng=jax.random.PRNGKey(0))
  constants = state["constants"]
  model = lambda params: nnx.merge(graphdef, params, constants)
  dora = plan.masking
  key = jax.random.PRNGKey(1)
  frames = vit.normalize_images(batch["frames"])
  crops = vit.normalize_images(batch["crops"])
  flat = lambda x: x.reshape((-1,) + x.shape[-3:])
  teacher_out = jax.jit(lambda p, f: model(p).backbone(flat(f)))(state["teacher"], frames)
  if dora is not None:
    views = jax.jit(lambda out, f: objects.object_views(dora, out, f, key)["views"])(
        teacher_out, frames)
  else:
    views = frames[:, :, None]
  num_views, dim = views.shape[2], teacher_out["cls"].shape[-1]
  out_dim = config.model.out_dim
  rng = np.random.default_rng(0)
  cotangent = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def backbone_grad(params, images, ct):
    return jax.grad(lambda p: jnp.sum(model(p).backbone(images, drop_path_rng=key)["cls"] * ct))(
        params)

  def head_grad(params, cls, ct):
    return jax.grad(lambda p, c: jnp.sum(model(p).head(c) * ct), argnums=(0, 1))(params, cls)

  b, t, m = crops.shape[:3]
  view_cls = cotangent(b * t * num_views, dim)
  crop_cls = cotangent(b * t * m, dim)
  probs = jax.nn.softmax(cotangent(b, t, out_dim))
  masked_logits = cotangent(b, t, num_views, out_dim)
  local_logits = cotangent(b, t, m, out_dim)
  schedule = schedules.make_schedules(config, steps_per_epoch=100, total_steps=1000).at(500)
  optimizer = optim.make_optimizer(config)

  def optimise(params, grads, opt_state, schedule):
    updates, opt_state = optimizer.update(grads, opt_state, params, **schedule)
    return optax.apply_updates(params, updates), opt_state

  parts = [
      Part("teacher ViT forward (full frames)", lambda p, f: model(p).backbone(flat(f)),
           state["teacher"], frames),
      Part("teacher head forward", lambda p, c: model(p).head(c), state["teacher"],
           teacher_out["cls"]),
  ]
  if dora is not None:
    parts.append(Part("objects: discover, refine, track, mask",
                      lambda out, f: objects.object_views(dora, out, f, key)["views"],
                      teacher_out, frames))
  parts += [
      Part(f"student ViT fwd+bwd, {b * t * num_views} views", backbone_grad, state["student"],
           flat(views), view_cls),
      Part(f"student ViT fwd+bwd, {b * t * m} local crops", backbone_grad, state["student"],
           flat(crops), crop_cls),
      Part(f"student head fwd+bwd, {b * t * (num_views + m)} rows (views and crops)", head_grad,
           state["student"], jnp.concatenate([view_cls, crop_cls]),
           cotangent(b * t * (num_views + m), out_dim)),
      Part("DINO loss fwd+bwd", jax.grad(
          lambda ml, ll, p: losses.dino_loss(p, ml, ll, student_temp=0.1), argnums=(0, 1)),
           masked_logits, local_logits, probs),
      Part("optimiser (clip, AdamW)", optimise, state["student"], state["student"],
           state["opt_state"], schedule),
      Part("teacher EMA", lambda t, s: jax.tree.map(lambda a, b: 0.996 * a + 0.004 * b, t, s),
           state["teacher"], state["student"]),
  ]
  return parts


def _interleave(items, steps: int) -> None:
  for _ in range(steps):
    for item in items:
      item.step()


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def main(argv):
  del argv
  _apply_preset()
  unknown = [s for s in _SETTINGS.value if s not in SETTINGS]
  if unknown:
    raise app.UsageError(f"--settings: unknown {unknown}; expected some of {SETTINGS}.")
  rng = np.random.default_rng(0)
  b, t, m = _CLIPS.value, _FRAMES.value, _LOCAL.value
  batch = {
      "frames": jnp.asarray(rng.integers(0, 256, (b, t, _SIZE.value, _SIZE.value, 3)), jnp.uint8),
      "crops": jnp.asarray(
          rng.integers(0, 256, (b, t, m, _LOCAL_SIZE.value, _LOCAL_SIZE.value, 3)), jnp.uint8),
  }
  device = jax.devices()[0]
  peak = flops_lib.device_peak(_DTYPE.value, cpu_devices_sharing=1)  # Steps run on one device.
  print(f"device: {device.device_kind} x{jax.device_count()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})  jax {jax.__version__}")
  print(f"model {_SIZES.value or _VARIANT.value}, out_dim {_OUT_DIM.value}, clips {b} x T={t}, "
        f"{_SIZE.value} px, M={m} crops of {_LOCAL_SIZE.value} px, {_DTYPE.value}")
  print(f"peak per device: {_fmt(peak and peak / 1e12, '.3f')} TFLOP/s "
        f"({'measured matmul' if device.platform == 'cpu' else 'table'})")

  rows = []
  for setting in _SETTINGS.value:
    for head in _HEAD.value:
      for remat in _REMAT.value or [None]:
        for scan in _SCAN.value:
          scan_on = scan.lower() == "true"
          name = " ".join([setting] + ([f"head={head}"] if len(_HEAD.value) > 1 else [])
                          + ([f"remat={vit.remat_policy(remat)}"] if len(_REMAT.value) > 1 else [])
                          + ([("scan" if scan_on else "unrolled")] if len(_SCAN.value) > 1 else []))
          rows.append(Row(name, _config(setting, remat, scan_on), batch, head))
          print(f"compiled {name}: {rows[-1].compile_seconds:.1f} s", flush=True)
  if _TORCH.value:
    import torch_reference  # pylint: disable=g-import-not-at-top  # torch is optional.
    config = _config("dora_keep", None, False)
    rows.append(torch_reference.TorchStep(
        vit.resolve_size(config.model.variant, **{
            key: config.model[key] or None for key in ("dim", "depth", "num_heads", "patch_size")}),
        np.asarray(batch["frames"]), np.asarray(batch["crops"]), _OUT_DIM.value,
        hidden_dim=config.model.head_hidden_dim, bottleneck_dim=config.model.head_bottleneck_dim,
        num_objects=config.dora.num_objects))
    print(f"built {rows[-1].name}", flush=True)
  parts = []
  if _BREAKDOWN.value:
    parts = _parts(_config(_SETTINGS.value[0], (_REMAT.value or [None])[0],
                           _SCAN.value[0].lower() == "true"), batch)  # The first row's choices.
  _interleave(rows + parts, _STEPS.value)

  print(f"\n{'step':<28} {'compile s':>9} {'s/step':>8} {'frames/s':>8} {'GFLOP':>8} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'XLA GiB':>8} {'vs row 1':>8}")
  first = statistics.median(rows[0].times)
  for row in rows:
    seconds = statistics.median(row.times)
    achieved = flops_lib.rates(row.flops, seconds, peak)
    print(f"{row.name:<28} {row.compile_seconds:9.1f} {seconds:8.3f} {b * t / seconds:8.3f} "
          f"{_fmt(row.flops and row.flops / 1e9, '8.1f')} "
          f"{_fmt(achieved.get('tflops'), '8.4f')} {_fmt(achieved.get('mfu'), '6.3f')} "
          f"{_fmt(row.memory, '8.2f')} {seconds / first:8.2f}")
  stats = getattr(device, "memory_stats", lambda: None)()
  device_peak = stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None
  if device_peak is not None:
    print(f"device peak memory in use (all rows): {device_peak:.2f} GiB")
  for row in rows:  # For scripts (benchmarks/accelerator.sh): one JSON object per row.
    seconds = statistics.median(row.times)
    print("row: " + json.dumps(dict(
        name=row.name, device=device.device_kind, compile_s=row.compile_seconds,
        s_per_step=seconds, frames_per_s=b * t / seconds, gflop=row.flops and row.flops / 1e9,
        **flops_lib.rates(row.flops, seconds, peak), xla_gib=row.memory,
        device_peak_gib=device_peak if len(rows) == 1 else None)))
  if parts:
    print(f"\nbreakdown of {rows[0].name} (median s over {_STEPS.value} interleaved runs):")
    total = 0.0
    for part in parts:
      seconds = statistics.median(part.times)
      total += seconds
      print(f"  {part.name:<42} {seconds:8.3f} s {100 * seconds / first:5.1f}%  "
            f"{_fmt(part.flops and part.flops / 1e9, '8.1f')} GFLOP")
    print(f"  {'sum of the parts':<42} {total:8.3f} s {100 * total / first:5.1f}% of the step")
  print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
  print(f"frames/s: {b * t / first:.3f}")


if __name__ == "__main__":
  app.run(main)
