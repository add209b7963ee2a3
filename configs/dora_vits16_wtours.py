r"""DoRA ViT-S/16 on Walking Tours: the paper's run (WT-Venice, 100 epochs, batch 128 clips).

Convert the video(s) once, then train:

  dora-convert /data/wt/Venice.mp4 --out /data/wt_venice
  dora-train --config configs/dora_vits16_wtours.py:data=/data/wt_venice \
      --workdir /ckpt/dora_vits16_venice

Arguments (after the colon, comma-separated):
  variant=B/16         another ViT (Ti/16, S/16, B/16, Ti/8, S/8, B/8); the default is S/16.
  data=DIR             the folder `dora-convert` wrote (shards + manifest.json).
  videos=venice+zurich the manifest ids to train on, '+'-separated; empty: every video in DIR;
                       a number (videos=3): the first that many videos of the manifest.
  runlocal             a few tiny steps on the synthetic walking tour (a smoke test, no data):
                         dora-train --config configs/dora_vits16_wtours.py:runlocal --workdir /tmp/x

For example ViT-B/16 on all ten videos converted into one folder:

  dora-convert /data/wt/*.mp4 --out /data/wt_all
  dora-train --config configs/dora_vits16_wtours.py:variant=B/16,data=/data/wt_all \
      --workdir /ckpt/dora_vitb16_wt10

Any key can be overridden, e.g. `--config.epochs=300 --config.batch_size=256`.
"""
import ml_collections

from dora_jax import config_base


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'variant=B/16,data=/x,runlocal' -> ConfigDict over `defaults`, values typed like them.

  A bare name sets a boolean default to True. An unknown name is an error that lists the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    name, has_value, value = part.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r} in {arg!r}; known: {sorted(defaults)}.")
    default = defaults[name]
    if isinstance(default, bool):
      if has_value and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {name}={value!r}: expected true or false.")
      result[name] = (not has_value) or value.lower() in ("true", "1")
    elif not has_value:
      raise ValueError(f"config argument {name!r} needs a value: {name}=...")
    else:
      result[name] = type(default)(value)
  return result


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, variant="S/16", data="", videos="", runlocal=False)
  c = config_base.get_base_config()

  # The paper's settings (DESIGN.md table); most are the base config's defaults, set here again
  # so that this file reads as the recipe.
  c.model.variant = args.variant
  c.model.drop_path_rate = 0.1
  c.model.head_hidden_dim = 2048
  c.model.head_bottleneck_dim = 256
  c.model.out_dim = 65536
  c.model.norm_last_layer = False

  c.dora.enabled = True
  c.dora.num_objects = 3
  c.dora.sinkhorn_iters = 3
  c.dora.sinkhorn_epsilon = 0.05
  c.dora.mask_mode = "remove"

  c.data.dir = args.data
  if args.videos.isdigit():
    c.data.num_videos = int(args.videos)
  else:
    c.data.video_ids = tuple(v for v in args.videos.split("+") if v)
  c.data.frames_per_clip = 8
  c.data.frame_stride = 60
  c.data.global_pre_size = 300
  c.data.global_pre_scale = (0.2, 1.0)
  c.data.global_size = 224
  c.data.global_scale = (0.4, 1.0)
  c.data.num_local_crops = 6
  c.data.local_size = 112
  c.data.local_scale = (0.05, 0.4)

  c.batch_size = 128  # 16 clips per GPU x 8 GPUs.
  c.epochs = 100
  c.total_steps = 0
  c.optim.base_lr = 5e-4
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.optim.clip_grad_norm = 3.0
  c.optim.freeze_last_layer_epochs = 1
  c.optim.teacher_momentum = 0.996
  c.loss.teacher_temp = 0.04
  c.loss.warmup_teacher_temp = 0.04
  c.loss.warmup_teacher_temp_epochs = 30
  c.loss.student_temp = 0.1
  c.loss.center_momentum = 0.9

  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  c.picture_every_steps = 1000

  if args.runlocal:
    # Shapes small enough for a laptop CPU; the recipe above is otherwise unchanged.
    c.data.synthetic = True
    c.data.frames_per_clip = 2
    c.data.frame_stride = 10
    c.data.global_pre_size = 96
    c.data.global_size = 64
    c.data.num_local_crops = 2
    c.data.local_size = 32
    c.data.num_workers = 0
    c.model.out_dim = 1024
    c.model.head_hidden_dim = 256
    c.model.head_bottleneck_dim = 64
    c.batch_size = 4
    c.total_steps = 4
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.picture_every_steps = 2
  return c
