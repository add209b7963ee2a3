r"""The DINO baseline on Walking Tours: the DoRA recipe with tracking and masking switched off.

The student sees the full frames (and the local crops) instead of the object-masked views; data,
model, schedule and every other setting are those of configs/dora_vits16_wtours.py, with the same
arguments (variant=, data=, videos=, runlocal):

  dora-convert /data/wt/Venice.mp4 --out /data/wt_venice
  dora-train --config configs/dino_vits16_wtours.py:data=/data/wt_venice \
      --workdir /ckpt/dino_vits16_venice
"""
import importlib.util
import os

import ml_collections


def _dora_config_module():
  # config_flags loads config files by path, not as a package: import the sibling the same way.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dora_vits16_wtours.py")
  spec = importlib.util.spec_from_file_location("dora_vits16_wtours", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _dora_config_module().get_config(arg)
  c.dora.enabled = False
  return c
