r"""The DINO baseline on Walking Tours: the DoRA recipe with tracking and masking switched off.

The student sees the full frames (and the local crops) instead of the object-masked views; data,
model, schedule and every other setting are those of configs/dora_vits16_wtours.py, with the same
arguments (variant=, data=, videos=, runlocal):

  dora-convert /data/wt/Venice.mp4 --out /data/wt_venice
  dora-train --config configs/dino_vits16_wtours.py:data=/data/wt_venice \
      --workdir /ckpt/dino_vits16_venice
"""
import ml_collections

from dora_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.apply_wtours_args(config_base.get_base_config(), arg)
  c.dora.enabled = False
  return c
