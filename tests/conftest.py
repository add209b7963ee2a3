"""Shared test setup: four fake CPU devices, and absl flags marked parsed.

The XLA flag must be set before jax is imported anywhere, hence here. Subprocesses started by
tests inherit it through the environment.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # pylint: disable=g-import-not-at-top

# grain's multiprocess prefetch reads absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order

from dora_jax import config_base  # pylint: disable=g-import-not-at-top
from dora_runs import set_key  # pylint: disable=g-import-not-at-top


def make_tiny_config(**overrides):
  """The tests' tiny run: `config_base.shrink_for_cpu` at 32 px with a 2-block, 4-head ViT of
  width 32, 2 frames per clip, a batch of 4 clips (one per fake device); `overrides` are dotted
  keys ("dora.num_objects": 3)."""
  config = config_base.shrink_for_cpu(config_base.get_base_config(), image_size=32, width=32,
                                      depth=2, num_heads=4)
  config.data.frames_per_clip = 2
  config.batch_size = 4
  for dotted, value in overrides.items():
    set_key(config, dotted, value)
  return config


@pytest.fixture(scope="session")
def tiny_config():
  """A factory of fresh tiny configs: `tiny_config(**{"dora.mask_mode": "keep"})`."""
  return make_tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A 40-frame synthetic tour stored at 96x64, for the end-to-end runs of a test file."""
  from dora_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tour")
  return synthetic.ensure_demo_data(str(root), num_frames=40, width=96, height=64, short_side=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The environment of dora-train processes: this checkout first on the path, and a compilation
  cache that every end-to-end run of the session shares (the same program compiles once)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cache = tmp_path_factory.getbasetemp() / "jax_cache_runs"
  cache.mkdir(exist_ok=True)
  # LLVM's optimisations double the compile time of these tiny programs and buy nothing here.
  xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
              XLA_FLAGS=xla_flags.strip(), JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
