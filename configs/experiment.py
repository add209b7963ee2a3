r"""The small experiment (experiments/dora_vs_dino.py): DoRA and its DINO baseline, one recipe.

  dora-train --config configs/experiment.py:method=dora,data=DIR --config.seed=0 --workdir W
  dora-train --config configs/experiment.py:method=dino,data=DIR --config.seed=0 --workdir W
  dora-export --init configs/experiment.py:method=dora,data=DIR --seed 0 --out W  # random arm

DIR holds the shards of the experiment's pretraining tour (six object kinds; the script makes
it). The model, views, optimiser, schedules and run length are the demo's (configs/demo.py: a
2-block ViT of width 64 with 8 heads and 8-px patches on 64-px views), for `steps` steps. The
two methods differ only in what defines them (config_base.dino_baseline: frames as images, two
global crops of the whole frame with DINO's blur/solarisation, flipped local crops, the loss over
pairs of different views), and DINO sees as many frames per step as DoRA (batch in images =
DoRA's clips x frames per clip) at the same learning rate per step (base_lr scaled down by the
frames per clip, since the trainer scales base_lr by the batch), with the warm-ups, counted in
epochs, scaled to the same number of steps.

Arguments (after the colon, comma-separated): method=dora|dino, data=DIR, steps=N, views=DIR
(the held-out object views, VIEWS/train and VIEWS/val, as make_eval_data.py writes them) and
knn_every=N: with both, the k-NN on those views every N steps and at the last step, at the
training resolution, logged as knn/top1 (a learning curve from one run).
"""
import os

import ml_collections

from dora_jax import config_base
from dora_jax.evaluation import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_base.parse_arg(arg, method="dora", data="", steps=3000, views="", knn_every=0)
  if args.method not in ("dora", "dino"):
    raise ValueError(f"configs/experiment.py: method must be dora or dino, got {args.method!r}.")
  # The demo's recipe (configs/demo.py says why each value), on the experiment's tour.
  c = config_base.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "demo.py"))
  c.data.synthetic = False
  c.data.dir = args.data
  c.total_steps = args.steps
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 1
  c.log_every_steps = 50
  c.picture_every_steps = 0
  if args.views and args.knn_every:
    c.evals.knn = registry.config(
        "knn", every_steps=args.knn_every, train=os.path.join(args.views, "train"),
        val=os.path.join(args.views, "val"), resize_size=c.data.global_size,
        crop_size=c.data.global_size)
  if args.method == "dino":
    frames_per_clip = c.data.frames_per_clip
    config_base.dino_baseline(c)
    c.batch_size *= frames_per_clip  # As many frames per step as DoRA...
    c.optim.base_lr /= frames_per_clip  # ...at the same learning rate per step...
    # ...and the same warm-ups in steps: an epoch of single frames at 4x the batch is ~1/4 of
    # DoRA's epoch of 4-frame clips (a clip per anchor frame: the tour's frames less a clip's
    # span, ~1.5% fewer at 600 frames).
    c.optim.warmup_epochs *= frames_per_clip
    c.loss.warmup_teacher_temp_epochs *= frames_per_clip
  return c
