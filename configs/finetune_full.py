r"""Full fine-tuning of a trained backbone: the usual ViT recipe (BEiT / MAE) for a ViT-S.

AdamW (betas 0.9, 0.999, weight decay 0.05 on weight matrices), lr 5e-4 per 256 images at batch
1024 with 5 warm-up epochs and a cosine to 1e-6, layer-wise lr decay 0.75, drop path 0.1, label
smoothing 0.1, 100 epochs on the [CLS] token. Views as the linear probe's (random-resized crops
and flips; resize 256 and centre crop 224 for validation). Not included: RandAugment, mixup,
cutmix and random erasing, which the published ImageNet fine-tuning numbers also use.

  dora-finetune --config configs/finetune_full.py:backbone=/ckpt/dora_vits16_wt10,train=/data/imagenet/train,val=/data/imagenet/val \
      --workdir /ckpt/dora_vits16_wt10_finetune

Arguments (after the colon, comma-separated): backbone=PATH, train=SRC, val=SRC as in
configs/finetune_linear.py. Any key can be overridden, e.g. `--config.full.layer_decay=0.65` for
a ViT-B.
"""
import ml_collections

from dora_jax.config_base import parse_arg
from dora_jax.finetune import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, backbone="", train="", val="")
  c = config_base.get_base_config()
  c.mode = "full"
  c.backbone.path = args.backbone
  c.full.drop_path_rate = 0.1
  c.full.layer_decay = 0.75
  c.full.label_smoothing = 0.1

  c.epochs = 100
  c.batch_size = 1024
  c.optim.base_lr = 5e-4
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 5
  c.optim.weight_decay = 0.05

  c.data.train = args.train
  c.data.val = args.val
  c.data.image_size = 224
  c.data.crop_scale = (0.08, 1.0)
  c.data.val_crop_fraction = 0.875
  c.log_every_steps = 50
  return c
