"""The config files: the paper's recipe, their arguments, overrides from the command line."""
import importlib.util
import os
import re

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from dora_jax import config_base
from dora_jax.evaluation import registry
from dora_jax.trainer import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = ("configs/dora_vits16_wtours.py", "configs/dino_vits16_wtours.py", "configs/demo.py")
# Model-size keys the model builder accepts beyond the base config (the demo's tiny ViT).
MODEL_OVERRIDES = {"model.dim", "model.depth", "model.num_heads", "model.patch_size"}


def _load(relative_path):
  path = os.path.join(ROOT, relative_path)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(prefix + key)
  return keys


def test_every_base_key_has_a_comment():
  source = open(os.path.join(ROOT, "dora_jax", "config_base.py")).read()
  base_keys = _flat_keys(config_base.get_base_config())
  for key in base_keys:
    line = re.search(rf"^\s*c\.{re.escape(key)} = .*$", source, re.MULTILINE)
    assert line and "#" in line.group(0), f"base key {key} has no one-line comment"


def test_every_evaluator_key_has_a_comment():
  """config.evals.NAME's keys are the evaluator module's DEFAULTS, commented there."""
  for type_name in registry.TYPES:
    module = registry.module(type_name)
    source = open(module.__file__).read()
    source = source[source.index("\nDEFAULTS = {"):]
    source = source[:source.index("\n}")]
    for key in module.DEFAULTS:
      line = re.search(rf'^\s*"{re.escape(key)}": .*$', source, re.MULTILINE)
      assert line and "#" in line.group(0), f"{type_name} key {key} has no one-line comment"


def _evaluator_keys(config):
  """The config.evals keys that are the registry's or their evaluator's (DEFAULTS)."""
  keys = set()
  for name, section in config.evals.items():
    known = {"type", "every_steps"} | set(
        registry.module(section.get("type", name)).DEFAULTS)
    keys |= {f"evals.{name}.{key}" for key in section if key in known}
  return keys


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_configs_use_only_base_keys_and_have_run_length_keys(path):
  module = _load(path)
  config = module.get_config()
  assert "dora-train --config " + path in module.__doc__  # The exact command is documented.
  assert "total_steps" in config and "checkpoint_every_steps" in config
  unknown = (_flat_keys(config) - _flat_keys(config_base.get_base_config()) - MODEL_OVERRIDES
             - _evaluator_keys(config))
  assert not unknown, f"{path} sets keys that the base config does not comment: {unknown}"


def test_paper_config_is_the_design_table():
  c = _load("configs/dora_vits16_wtours.py").get_config("data=/data/wt_venice")
  assert (c.model.variant, c.data.global_size, c.model.out_dim) == ("S/16", 224, 65536)
  assert (c.model.head_hidden_dim, c.model.head_bottleneck_dim) == (2048, 256)
  assert c.model.norm_last_layer is False
  assert (c.data.frames_per_clip, c.data.frame_stride) == (8, 60)
  assert (c.dora.num_objects, c.dora.sinkhorn_iters, c.dora.sinkhorn_epsilon) == (3, 3, 0.05)
  assert (c.data.num_local_crops, c.data.local_size, tuple(c.data.local_scale)) == (6, 112,
                                                                                     (0.05, 0.4))
  assert (c.data.global_pre_size, tuple(c.data.global_pre_scale)) == (300, (0.2, 1.0))
  assert tuple(c.data.global_scale) == (0.4, 1.0)
  assert (c.batch_size, c.epochs, c.total_steps) == (128, 100, 0)
  assert (c.optim.base_lr, c.optim.min_lr, c.optim.warmup_epochs) == (5e-4, 1e-5, 10)
  assert (c.optim.weight_decay, c.optim.weight_decay_end) == (0.04, 0.4)
  assert (c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs) == (0.04, 30)
  assert (c.loss.student_temp, c.loss.center_momentum) == (0.1, 0.9)
  assert (c.optim.teacher_momentum, c.optim.clip_grad_norm) == (0.996, 3.0)
  assert (c.optim.freeze_last_layer_epochs, c.model.drop_path_rate) == (1, 0.1)
  assert c.data.dir == "/data/wt_venice" and c.dora.enabled and not c.data.synthetic


def test_paper_config_arguments():
  module = _load("configs/dora_vits16_wtours.py")
  c = module.get_config("variant=B/16,data=/d,videos=venice+zurich")
  assert (c.model.variant, c.data.dir, tuple(c.data.video_ids)) == ("B/16", "/d",
                                                                    ("venice", "zurich"))
  assert tuple(module.get_config().data.video_ids) == ()
  three = module.get_config("videos=3")
  assert three.data.num_videos == 3 and tuple(three.data.video_ids) == ()
  small = module.get_config("runlocal")
  assert small.data.synthetic and small.total_steps > 0 and small.batch_size < 16
  with pytest.raises(ValueError, match="unknown config argument 'varaint'"):
    module.get_config("varaint=B/16")
  with pytest.raises(ValueError, match="needs a value"):
    module.get_config("data")


# What makes the DINO baseline DINO (facebookresearch/dino's views and loss); all else is DoRA's.
DINO_KEYS = {
    "dora.enabled": False,  # DINO's loss over pairs of different views.
    "data.frames_per_clip": 1, "data.frame_stride": 1,  # Frames as images.
    "data.global_pre_size": 0,  # Crops of the whole frame.
    "data.global_crops_per_frame": 2,
    "data.global_blur_prob": 1.0, "data.second_global_blur_prob": 0.1,
    "data.second_global_solarize_prob": 0.2, "data.local_flip_prob": 0.5,
}


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def test_dino_baseline_is_dino_views_and_loss_with_the_dora_recipe():
  dora = _load("configs/dora_vits16_wtours.py").get_config("variant=B/16,data=/d")
  dino = _load("configs/dino_vits16_wtours.py").get_config("variant=B/16,data=/d")
  for key, value in DINO_KEYS.items():
    assert _get(dino, key) == value, key
  assert tuple(dino.data.global_scale) == (0.4, 1.0) and dino.data.global_size == 224
  changed = {key for key in _flat_keys(dora) if _get(dora, key) != _get(dino, key)}
  assert changed <= set(DINO_KEYS), changed - set(DINO_KEYS)  # Same model, schedules, crops.
  preflight.check_config(dino)  # Passes the trainer's checks (frames_per_clip 1 is fine).
  small = _load("configs/dino_vits16_wtours.py").get_config("runlocal")
  assert small.data.frames_per_clip == 1 and small.data.global_crops_per_frame == 2
  preflight.check_config(small)


def test_dora_refuses_two_global_crops_and_dino_needs_a_pair_of_views():
  dora = _load("configs/dora_vits16_wtours.py").get_config("data=/d")
  dora.data.global_crops_per_frame = 2
  with pytest.raises(preflight.ConfigError, match="data.global_crops_per_frame=2: DoRA masks"):
    preflight.check_config(dora)
  dino = _load("configs/dino_vits16_wtours.py").get_config("data=/d")
  dino.data.global_crops_per_frame, dino.data.num_local_crops = 1, 0
  with pytest.raises(preflight.ConfigError, match="no pair of different views"):
    preflight.check_config(dino)


def test_demo_is_tiny_and_finite():
  c = _load("configs/demo.py").get_config()
  assert c.data.synthetic and c.total_steps > 0
  assert c.model.dim <= 128 and c.model.depth <= 4 and c.data.global_size <= 64
  assert c.dora.num_objects <= c.model.num_heads
  with pytest.raises(ValueError, match="takes no argument"):
    _load("configs/demo.py").get_config("x")


def _parse(argv):
  """Parses a dora-train command line's --config flags in a private FlagValues."""
  flag_values = flags.FlagValues()
  argv = ["dora-train"] + argv
  # config_flags reads the config file's name from the command line when the flag is defined.
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_command_line_overrides_and_argument():
  config = _parse([
      "--config", os.path.join(ROOT, "configs/dora_vits16_wtours.py") + ":variant=B/8",
      "--config.optim.base_lr=0.125", "--config.dora.mask_mode=keep",
      "--config.total_steps=8"])
  assert config.model.variant == "B/8"
  assert config.optim.base_lr == 0.125 and config.total_steps == 8
  assert config.dora.mask_mode == "keep"


def test_unknown_override_is_an_error_naming_it():
  # (dora-train turns this into a one-line error naming the whole flag; see test_train.py.)
  with pytest.raises(AttributeError, match="base_lrr"):
    _parse(["--config", os.path.join(ROOT, "configs/demo.py"), "--config.optim.base_lrr=1"])
