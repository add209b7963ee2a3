r"""The DINO baseline on Walking Tours ("DINO on the same video" in the DoRA paper): DINO itself.

Every stored frame is an image (clips of one frame). Per frame, as facebookresearch/dino's
DataAugmentationDINO: two global crops (224 px, data.global_scale 0.4-1 of the whole frame, no
pre-crop), each with its own flip, colour jitter and grayscale, the first always blurred, the
second blurred with p 0.1 and solarised with p 0.2; and the M local crops (flipped with p 0.5). The
teacher sees both global crops, the student every crop, and the loss is DINO's: the mean
cross-entropy over the (teacher global view, student view) pairs of different views
(`losses.dino_multicrop_loss`), the centre the mean teacher output over both global views.
Model, local crop count and size, optimiser, schedules and run length are those of
configs/dora_vits16_wtours.py, with the same arguments (variant=, data=, videos=, runlocal):

  dora-convert /data/wt/Venice.mp4 --out /data/wt_venice
  dora-train --config configs/dino_vits16_wtours.py:data=/data/wt_venice \
      --workdir /ckpt/dino_vits16_venice
"""
import ml_collections

from dora_jax import config_base
from dora_jax.evaluation import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.dino_baseline(config_base.apply_wtours_args(config_base.get_base_config(), arg))
  # The evaluations during pretraining (dora_jax/evaluation/registry.py), each off until given
  # data and a cadence, e.g. --config.evals.davis.data=/data/DAVIS
  # --config.evals.davis.every_steps=5000 (their keys are `dora-eval TYPE`'s flags).
  for type_name in registry.TYPES:
    c.evals[type_name] = registry.config(type_name)
  return c
