r"""The experiment's supervised bound: its ViT trained from a random init with the kind labels.

  dora-finetune --config configs/experiment_supervised.py:backbone=W/runs/random_s0,train=DATA/views/train,val=DATA/views/val \
      --config.seed=0 --workdir W/controls/supervised_s0

`backbone` is any encoder of the experiment's shape (experiments/dora_vs_dino.py passes the random
arm's `dora-export --init` folder): only its architecture is used (backbone.init=random). The
recipe is configs/finetune_full.py's (AdamW, drop path 0.1, label smoothing 0.1) at the
experiment's 64-px views: batch 64, `epochs` epochs (100: 1,500 steps on 960 training views),
lr 2e-3 per 256 images after 5 warm-up epochs, no layer-wise decay (nothing pretrained to keep),
training crops of 35-100 % of the view (the object fills most of it), validation on the whole
view as the k-NN sees it. WORKDIR/results.json holds the validation accuracy.

Arguments (after the colon, comma-separated): backbone=PATH, train=SRC, val=SRC, epochs=N.
"""
import os

import ml_collections

from dora_jax.config_base import load_config_file
from dora_jax.config_base import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, backbone="", train="", val="", epochs=100)
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "finetune_full.py"))
  c.backbone.path = args.backbone
  c.backbone.init = "random"
  c.data.train = args.train
  c.data.val = args.val
  c.full.layer_decay = 1.0
  c.epochs = args.epochs
  c.batch_size = 64
  c.optim.base_lr = 2e-3
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 5
  c.data.image_size = 64
  c.data.crop_scale = (0.35, 1.0)
  c.data.val_crop_fraction = 1.0
  c.data.num_workers = 0
  c.data.num_threads = 2
  c.eval_every_epochs = 10
  c.keep_checkpoints = 1
  c.log_every_steps = 50
  return c
