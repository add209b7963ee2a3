r"""`dora-train`: trains DoRA (or the DINO baseline) as a config describes.

  dora-train --config configs/demo.py --workdir workdirs/demo
  dora-train --config configs/dora_vits16_wtours.py:data=/data/wt_venice --workdir /ckpt/venice \
      --config.total_steps=8

Every config key can be overridden with --config.KEY=VALUE (an unknown key is an error). Running
the same command again in the same work folder resumes from its latest checkpoint.

On a multi-host Cloud TPU pod or a GPU cluster, pass --distributed (or set DORA_DISTRIBUTED=1) on
every host: `jax.distributed.initialize()` finds the other hosts from the environment (TPU
metadata, SLURM) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""
import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py[:ARG].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, metrics and pictures; the same folder resumes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("DORA_DISTRIBUTED", "") not in ("", "0", "false"),
    "Call jax.distributed.initialize() first (multi-host runs); default from $DORA_DISTRIBUTED.")
flags.mark_flags_as_required(["config", "workdir"])
# dora-finetune parses the same flags: it sets these to name itself and its config keys.
PROGRAM = "dora-train"
CONFIG_KEYS_FILE = "dora_jax/config_base.py"


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of libraries (orbax logs every save in detail); warnings stay."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "site-packages" not in record.pathname


def _fail(message: str, code: int) -> None:
  print(f"{PROGRAM}: error: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for an override of a key the config lacks."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # Loading a missing config file fails lazily: make it fail here.
    return remaining
  except OSError as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    _fail(f"cannot load --config {filename}: {lines[-1]}", 2)
  except flags.Error as e:
    lines = str(e).strip().splitlines()
    # A config file that raises comes with its traceback: keep the flag and the error line.
    _fail(lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}", 2)
  except (AttributeError, KeyError) as e:
    # ml_collections says "'base_lrr'\nDid you mean "base_lr"...": name the flag that has it.
    lines = str(e).strip("'\"").replace("\\n", "\n").split("\n")
    key = lines[0].strip("'\"\\")
    culprits = [arg.split("=")[0] for arg in argv if arg.startswith("--config.") and key in arg]
    hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
    _fail(f"unknown config key {key!r} in {', '.join(culprits) or 'the --config overrides'}"
          f"{hint}; see {CONFIG_KEYS_FILE} for the keys.", 2)
  except ValueError as e:  # From the config file's get_config(arg), e.g. an unknown argument.
    _fail(str(e).strip().splitlines()[0], 2)
  return []


def _main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; config keys are set with --config.KEY=VALUE.", 2)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    # Cluster environments (TPU metadata, SLURM, Open MPI, k8s) are detected by jax; elsewhere
    # (e.g. several processes on one machine) say it with these variables.
    counts = {name: int(os.environ[variable]) for name, variable in (
        ("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
              if variable in os.environ}
    jax.distributed.initialize(**counts)
  # Imported after jax.distributed: nothing may touch the devices before it.
  from dora_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from dora_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX %s: process %d of %d, %d devices (%d local).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, checkpoints.CheckpointMismatchError) as e:
    _fail(str(e), 2)
  except train.NonFiniteLossError as e:
    _fail(str(e), 1)


def main() -> None:
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
