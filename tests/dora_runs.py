"""What the end-to-end tests share: the tiny demo config as a config and as command-line flags,
and `dora-train` started as a process (test_train.py, test_checkpoints.py, test_cli_errors.py)."""
import contextlib
import importlib.util
import os
import subprocess
import sys
from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.py")

# The demo config, shrunk: 4 clips of 2 frames (one per device), 32-px frames, 8-px patches.
TINY = {
    "data.synthetic": False,
    "data.frames_per_clip": 2,
    "data.frame_stride": 3,
    "data.global_pre_size": 48,
    "data.global_size": 32,
    "data.num_local_crops": 1,
    "data.local_size": 16,
    "data.num_workers": 0,
    "model.dim": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.patch_size": 8,
    "model.out_dim": 128,
    "model.head_hidden_dim": 64,
    "model.head_bottleneck_dim": 32,
    "dora.num_objects": 2,
    "batch_size": 4,
    "total_steps": 16,
    "log_every_steps": 1,
    "checkpoint_every_steps": 8,
    "picture_every_steps": 16,
    "optim.warmup_epochs": 1,
    # The tracking IoU every 8 steps on the tour beside the shards (evals.track.data: see
    # tiny_overrides).
    "evals.track.every_steps": 8,
    "evals.track.clips": 2,
}


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_key(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def tiny_overrides(data_dir, overrides):
  """TINY + data.dir + overrides (keyword names may spell '.' as '__')."""
  return {**TINY, "data.dir": data_dir, "evals.track.data": os.path.dirname(data_dir),
          **{key.replace("__", "."): value for key, value in overrides.items()}}


def demo_config(data_dir, path=DEMO_CONFIG, arg=None, **overrides):
  config = load_config(path, arg)
  for key, value in tiny_overrides(data_dir, overrides).items():
    set_key(config, key, value)
  return config


def demo_flags(data_dir, **overrides):
  """The command-line overrides that turn configs/demo.py into the same tiny config."""
  return [f"--config.{key}={value}" for key, value in tiny_overrides(data_dir, overrides).items()]


def start_dora_train(args, env, log=None):
  """Starts dora-train; its output goes to pipes, or to the file `log` (for runs read later)."""
  if log is None:
    return subprocess.Popen([sys.executable, "-m", "dora_jax.cli.train"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "dora_jax.cli.train"] + args, cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT)


def run_to_end(args, env, timeout=300):
  process = start_dora_train(args, env)
  _, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, stderr[-3000:]
  return stderr


def save_untrained_run(workdir):
  """A dora-train work folder in `workdir` with one checkpoint (step 1) of a freshly initialised
  tiny demo model (width 32, 2 blocks, 2 heads, 8-px patches, 16-px views) whose student is all
  zeros, so that a command that evaluates the student by mistake fails; returns the teacher's ViT
  built in memory, to compare with what the command loads."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dora_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import step as train_step  # pylint: disable=g-import-not-at-top

  config = load_config(DEMO_CONFIG)
  config.model.dim, config.model.depth, config.model.num_heads = 32, 2, 2
  config.model.out_dim, config.model.head_hidden_dim, config.model.head_bottleneck_dim = 64, 32, 16
  config.data.global_size = 16
  graphdef, state = train_step.init_train_state(config, plan_lib.TrainPlan.from_config(config),
                                                rng=jax.random.PRNGKey(0))
  state = dict(state, student=jax.tree.map(jnp.zeros_like, state["student"]))
  checkpointer = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=1)
  checkpointer.save(1, state, {})
  checkpointer.wait_until_finished()
  checkpointer.close()
  checkpoint.write_config(workdir, config)
  return train_step.teacher_backbone(graphdef, state)


BUCKET = "gs://bucket"


@contextlib.contextmanager
def fake_bucket(root, *, local_paths=False):
  """Serves gs://bucket/... from the local folder `root` through etils' mock of epath's backends;
  yields the list of paths opened (appended to as they are). Other paths are refused, or with
  `local_paths` pass through to the local disk (images, a backbone)."""
  opened = []

  def mapped(fn, path, *args, **kwargs):
    text = os.fspath(path)
    if "://" in text or not local_paths:
      assert text == BUCKET or text.startswith(BUCKET + "/"), f"unexpected path {text}"
      opened.append(text)
      text = os.path.join(root, text[len(BUCKET) + 1:])
    return fn(text, *args, **kwargs)

  # With TensorFlow installed (the test extra has it) epath would pick tf.io.gfile for gs://,
  # which the mock does not replace.
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), epath_testing.mock_epath(
      open=mapped, exists=mapped, isdir=mapped, stat=mapped, makedirs=mapped, mkdir=mapped,
      listdir=mapped, remove=mapped, glob=mapped, walk=mapped):
    yield opened


class NoTensorBoard:
  """TensorBoard's own gs:// writer needs google-cloud-storage: not what the bucket tests test."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def add_scalar(self, *args, **kwargs):
    del args, kwargs

  def close(self):
    pass
