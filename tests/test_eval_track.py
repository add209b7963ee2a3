"""Tracking IoU: matching on hand-made masks, and the DoRA kernels on a tiny synthetic tour."""
import os

from flax import nnx
import numpy as np
from PIL import Image
import pytest

from dora_jax.data import synthetic
from dora_jax.evaluation import track
from dora_jax import objects
from dora_jax.models import vit


def _one_hot(truth, ids):
  return np.stack([truth == i for i in ids], axis=1)  # (T, k, H, W)


def test_ground_truth_masks_score_one():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 4, size=(3, 6, 8)).astype(np.uint8)
  truth[0, 0, :3] = [1, 2, 3]  # Every object is in the anchor.
  masks = _one_hot(truth, [3, 1])  # Tracked objects in another order than the ids.
  iou, matches = track.match_and_follow(masks, truth)
  np.testing.assert_array_equal(matches, [3, 1])
  np.testing.assert_array_equal(iou, np.ones((2, 3)))
  report = track.tracking_iou(masks[None], truth[None])
  assert report == {"track_iou": 1.0, "track_iou_per_offset": [1.0, 1.0, 1.0], "num_clips": 1}


def test_iou_follows_the_object_matched_in_the_anchor():
  truth = np.zeros((3, 4, 4), np.uint8)
  truth[:, :2, :2] = 1  # Object 1: 4 pixels, in every frame.
  truth[0, 2:, 2:] = 2  # Object 2: in the anchor only.
  tracked = np.zeros((3, 2, 4, 4), bool)
  tracked[0, 0, :2, :1] = True  # Object a: half of object 1 in the anchor (IoU 1/2)...
  tracked[1, 0, :2, :2] = True  # ...all of it in frame 1 (1)...
  tracked[2, 0, 2:, 2:] = True  # ...and object 2's place in frame 2, where 2 is gone (0).
  tracked[0, 1, 2:, 2:] = True  # Object b: object 2 in the anchor (1); then empty with it (1, 1).
  iou, matches = track.match_and_follow(tracked, truth)
  np.testing.assert_array_equal(matches, [1, 2])
  np.testing.assert_allclose(iou, [[0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
  report = track.tracking_iou(np.stack([tracked, tracked]), np.stack([truth, np.zeros_like(truth)]))
  assert report["num_clips"] == 1  # The second clip has no object in its anchor.
  assert report["track_iou_per_offset"] == pytest.approx([0.75, 1.0, 0.5])
  assert report["track_iou"] == pytest.approx(2.25 / 3)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
  root = tmp_path_factory.mktemp("tour")
  return synthetic.generate_walking_tour(str(root / "walking_tour.mp4"), num_frames=12, width=64,
                                         height=36, fps=5, num_objects=2, seed=0)["video"]


def test_the_kernels_on_clips_of_the_tour(tour):
  model = vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                                rngs=nnx.Rngs(0))
  settings = track.TrackSettings(num_clips=3, frames_per_clip=3, frame_stride=2, short_side=16,
                                 size_multiple=8, dora=objects.DoraOptions(num_objects=2), seed=0)
  frames, masks = track.load_tour(tour)
  clip_frames, clip_masks = track.make_clips(frames, masks, settings)
  # Anchors 0, 4 and 8 (spread over the 12 - 4 possible), frames 2 apart, 36 x 64 -> 16 x 24.
  assert clip_frames.shape == (3, 3, 16, 24, 3) and clip_masks.shape == (3, 3, 16, 24)
  np.testing.assert_array_equal(clip_masks[1, 2], np.asarray(
      Image.fromarray(masks[8]).resize((24, 16), Image.NEAREST)))
  report = track.evaluate_tracking(model, str(tour), settings, batch_size=4)
  assert len(report["track_iou_per_offset"]) == 3 and report["num_clips"] >= 1
  assert all(0 <= v <= 1 for v in report["track_iou_per_offset"])
  assert report["track_iou"] == pytest.approx(np.mean(report["track_iou_per_offset"]))
  # The masks scored are those of the kernels (a mean-thresholded heat map: some, not all, patches).
  tracked = track.track_objects(track.features_lib.Encoder(model, track.BACKBONE_OUTPUTS),
                                clip_frames, settings, batch_size=4)
  assert tracked.shape == (3, 3, 2, 16, 24) and 0 < tracked.mean() < 1
  assert report["track_iou"] == track.tracking_iou(tracked, clip_masks)["track_iou"]
  # The folder holding the tour works too.
  assert track.load_tour(os.path.dirname(tour))[0].shape == frames.shape


def test_tour_errors_are_one_line(tmp_path, tour):
  with pytest.raises(track.TourError, match="does not exist"):
    track.load_tour(str(tmp_path / "none.mp4"))
  (tmp_path / "video.mp4").write_bytes(open(tour, "rb").read())
  with pytest.raises(track.TourError, match="has no ground truth"):
    track.load_tour(str(tmp_path / "video.mp4"))
  with pytest.raises(track.TourError, match="spans 31"):
    track.make_clips(np.zeros((12, 8, 8, 3), np.uint8), np.zeros((12, 8, 8), np.uint8),
                     track.TrackSettings(num_clips=2, frames_per_clip=4, frame_stride=10,
                                         short_side=8, size_multiple=8,
                                         dora=objects.DoraOptions(), seed=0))
