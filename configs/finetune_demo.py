r"""The fine-tuning demo: the demo's DoRA backbone on labelled crops of synthetic tours, on a CPU.

  dora-train --config configs/demo.py --workdir workdirs/demo          # the backbone (~3 min)
  dora-finetune --config configs/finetune_demo.py --workdir workdirs/finetune_demo

The first run makes WORKDIR/demo_images: crops of the balls, boxes and kites of a new synthetic
walking tour (not the pretraining one), its first frames for training and its last frames for
validation. A linear probe trains on the frozen demo backbone (the [CLS] of both its blocks:
linear.num_last_blocks=2), then the same probe on a randomly initialised backbone of the same
shape (in WORKDIR/random_init); the last two lines give both validation accuracies (also in
WORKDIR/comparison.json). About 2.5 minutes on a 2-core CPU.

Arguments (after the colon, comma-separated):
  full            fine-tune the whole backbone instead (AdamW, layer decay, drop path).
  backbone=PATH   another backbone (default workdirs/demo, the demo's dora-train run).
"""
import ml_collections

from dora_jax.config_base import parse_arg
from dora_jax.finetune import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, full=False, backbone="workdirs/demo")
  c = config_base.get_base_config()
  c.mode = "full" if args.full else "linear"
  c.backbone.path = args.backbone
  c.compare_random_init = True

  c.data.demo = True
  c.data.image_size = 64  # The demo backbone's global views: 64 px, 8-px patches.
  c.data.crop_scale = (0.35, 1.0)  # The crops are tight around one object: keep most of it.
  c.data.num_workers = 0
  c.data.num_threads = 2

  c.linear.num_last_blocks = 2
  c.full.drop_path_rate = 0.1
  c.full.layer_decay = 0.75
  c.full.label_smoothing = 0.1

  c.batch_size = 64
  c.epochs = 20
  c.optim.base_lr = 0.2 if c.mode == "linear" else 2e-3
  c.optim.min_lr = 0.0
  c.optim.warmup_epochs = 0 if c.mode == "linear" else 2
  c.optim.weight_decay = 0.0 if c.mode == "linear" else 0.05

  c.log_every_steps = 10
  c.keep_checkpoints = 1
  return c
