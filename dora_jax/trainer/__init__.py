"""The trainer: what turns a config and a data folder into checkpoints (written through
`dora_jax.checkpoint`, the run folder's owner).

  train             `train_and_evaluate`: DoRA/DINO pretraining, read top to bottom.
  loop              the loop dora-train and dora-finetune share (`Job`, `run`, `restore_or_init`,
                    `Preemption`: SIGTERM and Ctrl-C at a step boundary).
  step              the train state, the loss of a batch, the jitted update.
  plan              `TrainPlan`: the config's model, DoRA and mesh sections, parsed once.
  preflight         every check before anything is written or compiled; the data plan.
  optim, schedules  AdamW with the decay mask and the frozen last layer; per-step schedules.
  sharding          the ('data', 'fsdp') mesh, the state's and the batch's shardings.
  metrics           metrics.jsonl, TensorBoard, the progress bar.
  compilation       the persistent compilation cache and the timed compile of the step.
  flops             a compiled program's FLOPs, the devices' peaks, MFU.
  pictures          the tracking picture (numpy/PIL).
"""
