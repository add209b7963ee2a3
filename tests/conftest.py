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
