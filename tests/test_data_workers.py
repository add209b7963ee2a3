"""No orphans: grain's worker processes exit when the process iterating the pipeline dies."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dora_jax.data import synthetic

_TRAINER = r"""
import sys, time
from dora_jax import config_base
from dora_jax.data import pipeline

config = config_base.get_base_config().data
config.dir = sys.argv[1]
config.frames_per_clip, config.frame_stride = 2, 3
config.global_pre_size, config.global_size, config.local_size = 40, 32, 16
config.num_local_crops, config.num_workers = 1, 2
iterator = pipeline.make_train_iterator(pipeline.plan_clips(config), config, batch_size=2, seed=0)
next(iterator)
print("ready", flush=True)
time.sleep(600)  # Killed long before.
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return synthetic.ensure_demo_data(str(tmp_path_factory.mktemp("tour")), num_frames=16, width=64,
                                    height=48, short_side=48, frames_per_shard=8)


def _alive(process: psutil.Process) -> bool:
  """Running (a zombie waiting for PID 1 to reap it has exited: it holds no memory)."""
  try:
    return process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def test_workers_exit_when_the_trainer_is_killed(data_dir):
  trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, data_dir], stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  descendants = []
  try:
    assert trainer.stdout.readline().strip() == "ready", "the pipeline did not start"
    descendants = psutil.Process(trainer.pid).children(recursive=True)
    workers = [p for p in descendants if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) >= 2, [p.cmdline() for p in descendants]  # data.num_workers=2
    os.kill(trainer.pid, signal.SIGKILL)  # No atexit, no finalizer, no signal handler runs.
    trainer.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in descendants) and time.monotonic() < deadline:
      time.sleep(0.2)
    left = [(p.pid, p.cmdline()) for p in descendants if _alive(p)]
    assert not left, f"still running after the trainer was killed: {left}"
  finally:
    trainer.kill()
    trainer.wait()
    for process in descendants:  # Only what this test started.
      if _alive(process):
        process.kill()
