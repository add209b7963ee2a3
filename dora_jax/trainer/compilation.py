"""Compiling the train step once, timed, through jax's persistent compilation cache.

The cache folder is `config.compilation_cache_dir`: "" uses the folder jax is already given
(JAX_COMPILATION_CACHE_DIR or jax.config), else WORKDIR/jax_cache, so that a restarted or
resumed run loads the compiled step instead of compiling it again; "none" turns the cache off;
any other value is the folder (it may be shared by runs: entries are keyed by the program, the
jax version and the devices). The cache is trusted code: keep it where only you can write.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache

from dora_jax import paths
from dora_jax.trainer import flops as flops_lib

CACHE_SUBDIR = "jax_cache"
# Programs that compile faster than this are not written to the cache (jax's default is 1 s;
# the picture function and the initialiser of a small model take about that).
MIN_COMPILE_SECONDS = 0.5


# The folder this module last gave jax, to tell it from one the user gave (a later run in the same
# process, with another work folder, must not inherit it).
_set_by_us: list[str | None] = [None]


def cache_folder(setting: str, workdir: str) -> str | None:
  """The persistent cache folder for `config.compilation_cache_dir` (None: no cache)."""
  if setting.lower() == "none":
    return None
  if setting:
    return os.path.abspath(os.path.expanduser(setting))
  given = jax.config.jax_compilation_cache_dir
  if given and given != _set_by_us[0]:
    return given
  return paths.join(paths.absolute(workdir), CACHE_SUBDIR)  # jax writes URLs through epath.


def enable_cache(setting: str, workdir: str) -> str | None:
  """Points jax's persistent compilation cache at `cache_folder(setting, workdir)` (or turns it
  off) for the compiles that follow in this process; returns the folder."""
  folder = cache_folder(setting, workdir)
  if folder != jax.config.jax_compilation_cache_dir:
    compilation_cache.set_cache_dir(folder)
    _set_by_us[0] = folder
    # jax decides once per process whether the cache is used: make it look again.
    compilation_cache.reset_cache()
  if folder is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      min(MIN_COMPILE_SECONDS, jax.config.jax_persistent_cache_min_compile_time_secs))
    logging.info("Persistent compilation cache: %s", folder)
  return folder


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A compiled program; the seconds from the call to the executable (`compile_seconds`), of
  which tracing and lowering to StableHLO took `lower_seconds` (the cache cannot save those);
  its FLOPs per run on one device (XLA's cost analysis; None when the backend does not say)."""
  executable: Any
  compile_seconds: float
  lower_seconds: float
  flops: float | None


def compile_step(jitted: Any, *args, unrolled: Any = None, loop_shards: int = 1) -> CompiledStep:
  """Lowers and compiles `jitted` for `args` (arrays or jax.ShapeDtypeStructs), timed.

  unrolled: the same computation written without loops (the train step with model.scan off),
    jitted alike, or None. XLA's cost analysis counts a loop's body once, so with loops the
    compiled count (per device) is short by the other trips. The twin is lowered, not compiled:
    the difference of the two lowered counts (whole program, before partitioning) is those
    trips, which `loop_shards` devices share (the loops run the ViT blocks on the batch, split
    over every device of the mesh). Within ~2% of the unrolled program's compiled count
    (tests/test_flops.py).
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_seconds = time.perf_counter() - start
  executable = lowered.compile()
  seconds = time.perf_counter() - start
  logging.info("Compiled in %.1f s: %.1f s tracing and lowering, %.1f s compiling or loading "
               "from the cache.", seconds, lower_seconds, seconds - lower_seconds)
  flops = flops_lib.compiled_flops(executable)
  if unrolled is not None and flops is not None:
    twin_start = time.perf_counter()
    looped, twin = flops_lib.compiled_flops(lowered), flops_lib.compiled_flops(
        unrolled.lower(*args))
    flops = None if not (looped and twin) else flops + (twin - looped) / loop_shards
    logging.info("FLOPs of the loops' other trips counted from the unrolled twin's lowering "
                 "(%.1f s).", time.perf_counter() - twin_start)
  return CompiledStep(executable, seconds, lower_seconds, flops)
