"""Model FLOPs utilisation (MFU): the FLOPs of a compiled step, the device's peak, their ratio.

The FLOPs are XLA's cost analysis of the compiled program (`compiled.cost_analysis()['flops']`):
what the partitioned program of one device executes, a (m, k) x (k, n) dot counted as 2 m k n,
elementwise arithmetic one per element, transcendentals (exp, erf, ...) not at all. So it counts
what the step does (the backward pass, the teacher, the tracking), not a formula of the model.
It counts the body of a loop (lax.scan, while) once, whatever the trip count: for a program whose
layers run under a scan (model.scan), `compilation.compile_step` corrects the count with the
lowered FLOPs of the unrolled twin (model.scan off, the same computation).

The peak is per device, dense, from the vendors' spec sheets for the kinds in `PEAK_TFLOPS`; on
the CPU it is measured once with a large matmul (`measure_matmul_peak`), shared by the fake
devices of one host; for any other device it is unknown (None) and no MFU is reported.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# device_kind -> dense TFLOP/s per chip for (bfloat16 matmuls, float32 matmuls at jax's default
# precision). Float32 at the default precision runs as one bfloat16 pass on TPU (so the bfloat16
# peak) and as TF32 on the tensor cores of A100/H100/H200 (the TF32 peak; the plain FP32 vector
# peaks are 19.5 / 67 / 67 / 51 / 60 TFLOP/s). Sources: Google Cloud TPU system architecture pages
# (v4, v5e, v5p, v6e) and NVIDIA's A100, H100 and H200 datasheets (sparsity figures halved).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),  # v5e
    "TPU v5e": (197.0, 197.0),
    "TPU v5": (459.0, 459.0),  # v5p
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),  # v6e (Trillium)
    "TPU v6e": (918.0, 918.0),
    "NVIDIA A100": (312.0, 156.0),  # SXM and PCIe, 40 and 80 GB.
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H100 NVL": (835.0, 418.0),
    "NVIDIA H100": (989.0, 494.5),  # SXM ("NVIDIA H100 80GB HBM3").
    "NVIDIA H200 NVL": (835.0, 418.0),
    "NVIDIA H200": (989.0, 494.5),  # SXM.
}


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one run of a compiled program per device (XLA's cost analysis), or None.

  compiled: the result of `jax.jit(f).lower(...).compile()` (or of `.lower(...)`: the count
    of the program before XLA's optimisations and partitioning).
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return None
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def table_peak(device_kind: str, dtype: Any) -> float | None:
  """The table's dense peak in FLOP/s of one `device_kind` chip for `dtype` matmuls, or None.

  The longest table name that starts `device_kind` wins ("NVIDIA H100 PCIe" before "NVIDIA H100").
  """
  names = [name for name in PEAK_TFLOPS if device_kind == name or device_kind.startswith(name + " ")
           or device_kind.startswith(name + "-")]
  if not names:
    return None
  bfloat16, float32 = PEAK_TFLOPS[max(names, key=len)]
  return 1e12 * (bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else float32)


def measure_matmul_peak(dtype: Any = jnp.float32, *, size: int = 1024, repeats: int = 5,
                        device: jax.Device | None = None) -> float:
  """FLOP/s of the fastest of `repeats` (size x size) @ (size x size) matmuls on `device`.

  About 0.1 s on a 2-core VM at 1024. On the CPU one device's matmul uses every core, so this is
  the host's peak whatever the number of (fake) devices.
  """
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def device_peak(dtype: Any, device: jax.Device | None = None, *,
                cpu_devices_sharing: int | None = None) -> float | None:
  """Dense peak FLOP/s of one device for `dtype` matmuls: the table's, or measured on the CPU,
  or None (unknown).

  The CPU devices of a host share its cores: a program partitioned over all of them gets
  1/local_device_count of the measured peak each (the default); a program on one device gets
  all of it (cpu_devices_sharing=1).
  """
  device = device or jax.devices()[0]
  peak = table_peak(device.device_kind, dtype)
  if peak is None and device.platform == "cpu":
    sharing = cpu_devices_sharing or jax.local_device_count()
    peak = measure_matmul_peak(dtype, device=device) / sharing
  return peak


def rates(flops_per_step: float | None, step_time: float,
          peak: float | None) -> dict[str, float]:
  """{'tflops': achieved TFLOP/s per device, 'mfu': that over the peak}, each only when known."""
  if not flops_per_step or step_time <= 0:
    return {}
  achieved = flops_per_step / step_time
  out = {"tflops": achieved / 1e12}
  if peak:
    out["mfu"] = achieved / peak
  return out
