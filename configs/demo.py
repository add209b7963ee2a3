r"""The demo: a tiny DoRA on a synthetic walking tour, about five minutes on a 2-core CPU.

  pip install -e . && dora-train --config configs/demo.py --workdir workdirs/demo

The first run generates the synthetic video (a camera panning over bundled photos while textured
balls, boxes and kites move and occlude each other) into WORKDIR/demo_data and converts it to
shards. Then a 4-block ViT (width 64, 4 heads, 8-px patches) trains on clips of 4 frames; watch
`loss` fall on the progress bar and the pictures WORKDIR/pictures/step_*.png, where the heat maps
of the discovered objects follow them over the frames. Everything is written to WORKDIR:
metrics.jsonl, tensorboard/, checkpoints/ and pictures/. Run the same command again to resume.
"""
import ml_collections

from dora_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/demo.py takes no argument (got {arg!r}); override keys with "
                     "--config.key=value instead.")
  c = config_base.shrink_for_cpu(config_base.get_base_config())
  c.seed = 0
  c.data.frames_per_clip = 4
  c.data.frame_stride = 6
  c.data.num_workers = 1

  c.total_steps = 300
  c.optim.base_lr = 0.02  # Per 256 clips, i.e. 6.25e-4 at batch 8: a tiny model learns fast.
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 1
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.1
  c.optim.freeze_last_layer_epochs = 0
  c.optim.teacher_momentum = 0.99
  # A sharper teacher than the paper's 0.04: at 0.04 this tiny model drifts towards the uniform
  # collapse within the demo (teacher entropy up to ~4.2 of log 256, KL to ~0.05).
  c.loss.warmup_teacher_temp = 0.02
  c.loss.teacher_temp = 0.02
  c.loss.warmup_teacher_temp_epochs = 0

  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 2
  c.log_every_steps = 10
  c.picture_every_steps = 100
  return c
