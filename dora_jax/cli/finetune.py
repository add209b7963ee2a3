r"""`dora-finetune`: a linear probe or full fine-tuning of a trained backbone, as a config describes.

  dora-finetune --config configs/finetune_linear.py:backbone=/ckpt/venice,train=/data/in1k/train,val=/data/in1k/val \
      --workdir /ckpt/venice_linear
  dora-finetune --config configs/finetune_demo.py --workdir workdirs/finetune_demo

Every config key can be overridden with --config.KEY=VALUE (see dora_jax/finetune/config_base.py).
Running the same command again in the same work folder resumes from its latest checkpoint. The
flags, the one-line errors, the exit codes (2 bad input, 1 run failure, 130 Ctrl-C) and the log
file (WORKDIR/dora-finetune.log) are dora-train's (`dora_jax.cli.runner`), under this
program's name.
"""
from dora_jax.cli import runner

NAME = "dora-finetune"


def report(results: dict) -> str:
  """One line per run with its final and best validation accuracy."""
  runs = {results["init"]: results} if "mode" in results else results
  return "\n".join(
      f"{NAME}: {result['mode']} from a {init} backbone: validation accuracy "
      f"{result['val_accuracy']:.4f} (best {result['best_val_accuracy']:.4f}) after "
      f"{result['steps']} steps" for init, result in runs.items()
      if result["val_accuracy"] is not None)


def _finetune(config, workdir: str) -> dict:
  # Imported after jax.distributed has started (runner.main): nothing may touch the devices before.
  from dora_jax.finetune import train  # pylint: disable=g-import-not-at-top

  return train.run(config, workdir)


PROGRAM = runner.Program(name=NAME, config_keys_file="dora_jax/finetune/config_base.py",
                         run=_finetune, report=report)


def main() -> None:
  runner.main(PROGRAM)


if __name__ == "__main__":
  main()
