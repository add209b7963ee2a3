r"""Linear probe of a trained backbone, as DINO's linear evaluation (eval_linear.py) of a ViT-S.

The backbone is frozen; a linear classifier on the [CLS] of its last 4 blocks trains for 100
epochs with SGD (momentum 0.9, no weight decay), lr 0.001 per 256 images at batch 1024, cosine to
0; training views are random-resized crops (scale 0.08-1) with flips, validation views a resize
to 256 and a centre crop of 224.

  dora-finetune --config configs/finetune_linear.py:backbone=/ckpt/dora_vits16_venice,train=/data/imagenet/train,val=/data/imagenet/val \
      --workdir /ckpt/dora_vits16_venice_linear

Arguments (after the colon, comma-separated):
  backbone=PATH   a dora-train work folder, one of its checkpoints/STEP, or a dora-export folder.
  train=SRC       training images: an image folder (ROOT/CLASS/IMAGE) or tfds:NAME:SPLIT.
  val=SRC         validation images, the same forms and classes.
  blocks=N        [CLS] of the last N blocks (DINO: 4 for ViT-S, 1 for ViT-B).
  avgpool         also the mean patch token (DINO: on for ViT-B).

For a ViT-B: `blocks=1,avgpool`. Any key can be overridden, e.g. `--config.optim.base_lr=0.01`
(DINO recommends tuning the learning rate per checkpoint).
"""
import ml_collections

from dora_jax.config_base import parse_arg
from dora_jax.finetune import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, backbone="", train="", val="", blocks=4, avgpool=False)
  c = config_base.get_base_config()
  c.mode = "linear"
  c.backbone.path = args.backbone
  c.linear.num_last_blocks = args.blocks
  c.linear.avgpool = args.avgpool

  c.epochs = 100
  c.batch_size = 1024  # 128 per GPU x 8 GPUs.
  c.optim.base_lr = 0.001
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 0
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0

  c.data.train = args.train
  c.data.val = args.val
  c.data.image_size = 224
  c.data.crop_scale = (0.08, 1.0)
  c.data.val_crop_fraction = 0.875
  c.log_every_steps = 50
  return c
