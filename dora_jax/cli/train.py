r"""`dora-train`: trains DoRA (or the DINO baseline) as a config describes.

  dora-train --config configs/demo.py --workdir workdirs/demo
  dora-train --config configs/dora_vits16_wtours.py:data=/data/wt_venice --workdir /ckpt/venice \
      --config.total_steps=8

Every config key can be overridden with --config.KEY=VALUE (an unknown key is an error; the keys
are in dora_jax/config_base.py). Running the same command again in the same work folder resumes
from its latest checkpoint.

On a multi-host Cloud TPU pod or a GPU cluster, pass --distributed (or set DORA_DISTRIBUTED=1) on
every host: `jax.distributed.initialize()` finds the other hosts from the environment (TPU
metadata, SLURM) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.

A failure is one line on stderr (`dora-train: error: ...`) and a non-zero exit status: 2 for bad
input (flags, config, a work folder in use or of another model), 1 when the run fails (a NaN loss,
a full disk, damaged checkpoints), 130 on Ctrl-C. Unexpected failures append their traceback, and
the warnings and errors logged before them, to WORKDIR/dora-train.log; --verbose (or
DORA_DEBUG=1) prints the traceback instead. The flags, errors and exit codes are
`dora_jax.cli.runner`'s, which dora-finetune shares.
"""
from dora_jax import config_base
from dora_jax.cli import runner


def _train(config, workdir: str) -> dict[str, float]:
  # Imported after jax.distributed has started (runner.main): nothing may touch the devices before.
  from dora_jax.trainer import train  # pylint: disable=g-import-not-at-top

  return train.train_and_evaluate(config, workdir)


PROGRAM = runner.Program(name="dora-train", config_keys_file="dora_jax/config_base.py",
                         run=_train, replaced_key=config_base.replaced_key)


def main() -> None:
  runner.main(PROGRAM)


if __name__ == "__main__":
  main()
