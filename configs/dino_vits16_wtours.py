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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.apply_wtours_args(config_base.get_base_config(), arg)
  c.dora.enabled = False
  c.data.frames_per_clip = 1  # Frames as images.
  c.data.frame_stride = 1
  c.data.global_pre_size = 0  # Crops of the whole frame.
  c.data.global_crops_per_frame = 2
  c.data.global_blur_prob = 1.0
  c.data.second_global_blur_prob = 0.1
  c.data.second_global_solarize_prob = 0.2
  c.data.local_flip_prob = 0.5
  return c
