"""The keys dora-train and dora-finetune share: declared once (config_base), checked once
(preflight.check_run_keys), with the same message from both programs (four fake devices)."""
import pytest

from dora_jax import config_base
from dora_jax.finetune import checks
from dora_jax.finetune import config_base as finetune_config_base
from dora_jax.trainer import preflight

SHARED = ("seed", "epochs", "total_steps", "batch_size", "mesh", "checkpoint_every_steps",
          "keep_checkpoints", "log_every_steps")


def _finetune_config(**overrides):
  config = finetune_config_base.get_base_config()
  config.backbone.path = "/runs/venice"  # Only checked to be non-empty here.
  config.batch_size = 8
  for key, value in overrides.items():
    _set(config, key, value)
  return config


def _set(config, key, value):
  *parents, name = key.split(".")
  for parent in parents:
    config = config[parent]
  config[name] = value


def test_both_base_configs_declare_the_shared_keys_alike():
  train, finetune = config_base.get_base_config(), finetune_config_base.get_base_config()
  assert all(key in train and key in finetune for key in SHARED)
  assert train.mesh.to_dict() == finetune.mesh.to_dict()
  # What differs is each program's default, given where the keys are declared.
  assert (train.batch_size, finetune.batch_size) == (128, 1024)
  assert (train.checkpoint_every_steps, finetune.checkpoint_every_steps) == (1000, 0)


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 6}, "config batch_size=6 does not divide over the 4 devices: use a multiple "
                        "of 4 (e.g. --config.batch_size=8)."),
    ({"batch_size": 0}, "config batch_size=0: must be a positive multiple of the 4 devices"),
    ({"mesh.fsdp": 3}, "config mesh.fsdp=3 does not divide the 4 devices"),
    ({"log_every_steps": 0}, "config log_every_steps=0: must be at least 1."),
    ({"total_steps": -1}, "config total_steps=-1, epochs="),
])
def test_both_programs_give_one_message_per_shared_check(tiny_config, overrides, message):
  errors = []
  for check, config in ((preflight.check_config, tiny_config(**overrides)),
                        (checks.check_config, _finetune_config(**overrides))):
    with pytest.raises(preflight.ConfigError) as error:
      check(config)
    errors.append(str(error.value))
  assert errors[0] == errors[1] and errors[0].startswith(message), errors


def test_checkpoint_cadence_zero_means_validations_only_in_finetuning(tiny_config):
  checks.check_config(_finetune_config(checkpoint_every_steps=0))
  with pytest.raises(checks.ConfigError, match=r"checkpoint_every_steps=-1: must be at least 0\.$"):
    checks.check_config(_finetune_config(checkpoint_every_steps=-1))
  with pytest.raises(preflight.ConfigError, match=r"checkpoint_every_steps=0: must be at least 1\.$"):
    preflight.check_config(tiny_config(checkpoint_every_steps=0))
