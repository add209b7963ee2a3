r"""DoRA ViT-S/16 on Walking Tours: the paper's run (WT-Venice, 100 epochs, batch 128 clips).

The paper's settings are the defaults of dora_jax/config_base.py (docs/DESIGN.md has the table);
this file only reads its arguments. Convert the video(s) once, then train:

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
from dora_jax.evaluation import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.apply_wtours_args(config_base.get_base_config(), arg)
  # The evaluations during pretraining (dora_jax/evaluation/registry.py), each off until given
  # data and a cadence, e.g. --config.evals.davis.data=/data/DAVIS
  # --config.evals.davis.every_steps=5000 (their keys are `dora-eval TYPE`'s flags).
  for type_name in registry.TYPES:
    c.evals[type_name] = registry.config(type_name)
  return c
