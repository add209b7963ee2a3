"""The command lines, one module per console script.

  convert   dora-convert   videos -> TFRecord shards + manifest.json
  train     dora-train     DoRA/DINO pretraining
  eval      dora-eval      k-NN, DAVIS, tracking IoU of a trained encoder
  export    dora-export    exported folders and PyTorch .pth in and out
  finetune  dora-finetune  linear probe or full fine-tuning
  runner                   what dora-train and dora-finetune share: flags, jax.distributed,
                           one-line errors, exit codes, WORKDIR/PROGRAM.log
"""
