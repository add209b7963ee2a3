r"""`dora-finetune`: a linear probe or full fine-tuning of a trained backbone, as a config describes.

  dora-finetune --config configs/finetune_linear.py:backbone=/ckpt/venice,train=/data/in1k/train,val=/data/in1k/val \
      --workdir /ckpt/venice_linear
  dora-finetune --config configs/finetune_demo.py --workdir workdirs/finetune_demo

Every config key can be overridden with --config.KEY=VALUE (see dora_jax/finetune/config_base.py).
Running the same command again in the same work folder resumes from its latest checkpoint. The
flags and their one-line errors are dora-train's (`dora_jax.cli.train`), under this program's name.
"""
import os

from absl import app
from absl import logging

from dora_jax.cli import train as cli

PROGRAM = "dora-finetune"
CONFIG_KEYS_FILE = "dora_jax/finetune/config_base.py"


def report(results: dict) -> str:
  """One line per run with its final and best validation accuracy."""
  runs = {results["init"]: results} if "mode" in results else results
  return "\n".join(
      f"{PROGRAM}: {result['mode']} from a {init} backbone: validation accuracy "
      f"{result['val_accuracy']:.4f} (best {result['best_val_accuracy']:.4f}) after "
      f"{result['steps']} steps" for init, result in runs.items()
      if result["val_accuracy"] is not None)


def _main(argv) -> None:
  if len(argv) > 1:
    cli._fail(f"unexpected arguments {argv[1:]}; config keys are set with --config.KEY=VALUE.", 2)
  logging.get_absl_handler().addFilter(cli._QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top

  if cli._DISTRIBUTED.value:
    counts = {name: int(os.environ[variable]) for name, variable in (
        ("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
              if variable in os.environ}
    jax.distributed.initialize(**counts)
  # Imported after jax.distributed: nothing may touch the devices before it.
  from dora_jax.trainer import checkpoints  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import lock as workdir_lock  # pylint: disable=g-import-not-at-top
  from dora_jax.finetune import checks  # pylint: disable=g-import-not-at-top
  from dora_jax.finetune import train  # pylint: disable=g-import-not-at-top

  try:
    results = train.run(cli._CONFIG.value, cli._WORKDIR.value)
  except (checks.ConfigError, checkpoints.CheckpointMismatchError,
          workdir_lock.WorkdirLockedError) as e:
    cli._fail(str(e), 2)
  except train.NonFiniteLossError as e:
    cli._fail(str(e), 1)
  if jax.process_index() == 0 and report(results):
    print(report(results))


def main() -> None:
  cli.PROGRAM, cli.CONFIG_KEYS_FILE = PROGRAM, CONFIG_KEYS_FILE
  app.run(_main, flags_parser=cli._parse_flags)


if __name__ == "__main__":
  main()
