"""The evaluators during pretraining: config keys, schedule, and a run on tiny data."""
import os

from flax import nnx
import numpy as np
from PIL import Image
import pytest

from dora_jax import config_base
from dora_jax.data import eval_sets
from dora_jax.data import synthetic
from dora_jax.data import images as images_lib
from dora_jax.evaluation import periodic
from dora_jax.evaluation import seg
from dora_jax.evaluation import seg_data
from dora_jax.evaluation import track
from dora_jax import objects
from dora_jax.models import vit


def _config(**eval_keys):
  config = config_base.get_base_config()
  config.model.variant = "Ti/8"
  config.model.dim, config.model.depth, config.model.num_heads = 32, 2, 4
  config.data.global_size, config.data.frames_per_clip, config.data.frame_stride = 16, 3, 2
  config.dora.num_objects = 2
  for key, value in eval_keys.items():
    config.eval[key] = value
  return config


def _colour_folder(root, images_per_class):
  """Three classes of flat colours (red, green, blue) with a little noise."""
  rng = np.random.default_rng(0)
  for label, name in enumerate(("blue", "green", "red")):
    os.makedirs(root / name)
    for i in range(images_per_class):
      colour = np.zeros(3)
      colour[2 - label] = 200
      pixels = np.clip(colour + rng.normal(0, 10, size=(20, 20, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.png")
  return str(root)


def test_defaults_evaluate_nothing():
  config = _config()
  assert config.eval.every_steps == 0 and not config.eval.knn_train and not config.eval.track_data
  evaluator = periodic.PeriodicEvaluator.from_config(config)
  assert not evaluator.enabled and not evaluator.due(100, 100)


def test_settings_are_checked_and_derived_from_the_training_config():
  with pytest.raises(ValueError, match="eval.knn_train and eval.knn_val go together"):
    periodic.EvalSettings.from_config(_config(knn_train="/data/train"))
  with pytest.raises(ValueError, match='eval.track_data="demo" needs'):
    periodic.EvalSettings.from_config(_config(track_data="demo"))
  with pytest.raises(ValueError, match="eval.knn_k must be a positive integer"):
    periodic.EvalSettings.from_config(_config(knn_k=0))
  settings = periodic.EvalSettings.from_config(_config(track_data="demo"), demo_tour="/x/demo")
  assert settings.track_data == "/x/demo"
  assert settings.track == track.TrackSettings(
      num_clips=16, frames_per_clip=3, frame_stride=2, short_side=16, size_multiple=8,
      dora=objects.DoraOptions(num_objects=2, sinkhorn_iters=3, sinkhorn_epsilon=0.05,
                               mask_mode="remove", mask_threshold="mean"), seed=0)


def test_missing_data_fails_when_the_evaluator_is_built(tmp_path):
  with pytest.raises(images_lib.SourceError, match="does not exist"):
    periodic.PeriodicEvaluator.from_config(_config(
        every_steps=10, knn_train=str(tmp_path / "a"), knn_val=str(tmp_path / "b")))
  with pytest.raises(track.TourError, match="does not exist"):
    periodic.PeriodicEvaluator.from_config(_config(every_steps=10,
                                                   track_data=str(tmp_path / "t.mp4")))


def test_run_on_tiny_data(tmp_path):
  tour = synthetic.generate_walking_tour(str(tmp_path / "walking_tour.mp4"), num_frames=10,
                                         width=48, height=32, fps=5, num_objects=2, seed=0)
  config = _config(every_steps=5, batch_size=6, knn_k=3, knn_resize_size=20, knn_crop_size=16,
                   knn_train=_colour_folder(tmp_path / "train", 4),
                   knn_val=_colour_folder(tmp_path / "val", 2),
                   track_data=str(tmp_path), track_clips=2)
  evaluator = periodic.PeriodicEvaluator.from_config(config)
  with pytest.raises(track.TourError, match="the tour has 10 frames"):  # Checked when built.
    periodic.PeriodicEvaluator.from_config(_config(every_steps=5, track_data=str(tmp_path),
                                                   track_frame_stride=5))
  assert [s for s in range(1, 13) if evaluator.due(s, total_steps=12)] == [5, 10, 12]
  model = vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                                rngs=nnx.Rngs(0))
  metrics = evaluator.run(model, step=5)
  assert set(metrics) == {"knn_top1", "knn_top5", "track_iou", "track_iou_last"}
  # Flat colours are told apart even by a random ViT; 3 classes: top-5 holds them all.
  assert metrics["knn_top1"] == 100.0 and metrics["knn_top5"] == 100.0
  assert 0 <= metrics["track_iou"] <= 1 and 0 <= metrics["track_iou_last"] <= 1
  expected = track.evaluate_tracking(model, tour["video"], evaluator.settings.track, batch_size=6)
  assert metrics["track_iou"] == pytest.approx(expected["track_iou"])
  assert metrics["track_iou_last"] == pytest.approx(expected["track_iou_per_offset"][-1])
  # Another model, same cached data: other numbers, and the same again for the same model.
  other = vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                                rngs=nnx.Rngs(1))
  assert evaluator.run(other, step=10)["track_iou"] != metrics["track_iou"]
  assert evaluator.run(model, step=12) == metrics


def _ade_folder(root):
  """Training and validation frames of 16 px: left half one object (class 1), right background."""
  masks = np.zeros((4, 16, 16), np.uint8)
  masks[:, :, :8] = 1
  frames = np.where(masks[..., None] == 1, [200, 30, 30], [30, 30, 200]).astype(np.uint8)
  for split in seg_data.SPLITS:
    eval_sets.write_ade20k_layout(frames, masks, [1], str(root), split,
                                  class_names=["cat", "dog"])
  return str(root)


def test_seg_readout_during_pretraining(tmp_path):
  with pytest.raises(seg_data.SegError, match="has no images/training folder"):
    periodic.PeriodicEvaluator.from_config(_config(every_steps=5, seg_data=str(tmp_path)))
  with pytest.raises(ValueError, match="eval.seg_image_size: 20 is not a multiple"):
    periodic.EvalSettings.from_config(_config(seg_image_size=20))
  config = _config(every_steps=5, seg_data=_ade_folder(tmp_path / "ade"), seg_iterations=3,
                   seg_batch_size=2)
  evaluator = periodic.PeriodicEvaluator.from_config(config)
  assert evaluator.settings.seg.image_size == 16 and evaluator.enabled  # data.global_size.
  model = vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                                rngs=nnx.Rngs(0))
  metrics = evaluator.run(model, step=5)
  expected = seg.evaluate_seg(model, *[seg_data.ADE20KFolder(config.eval.seg_data, split)
                                       for split in seg_data.SPLITS],
                              evaluator.settings.seg, progress=False)
  assert set(metrics) == {"seg_miou"} and metrics["seg_miou"] == pytest.approx(expected["mIoU"])
