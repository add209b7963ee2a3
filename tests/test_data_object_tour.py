"""The object tour: many instances enter and leave, masks mark the drawn pixels, sizes vary,
backgrounds change, and the same seed gives the same files."""
import numpy as np
import pytest
from scipy import ndimage

from dora_jax.data import object_tour
from dora_jax.data import synthetic

SMALL = dict(num_frames=360, width=96, height=64, fps=30, objects_at_once=3, seed=4,
             frames_per_background=60)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tour") / "objects.mp4")
  return object_tour.generate_object_tour(path, **SMALL)


def _border(mask):
  return np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])


def test_objects_enter_cross_and_leave(tour):
  masks = synthetic.load_masks(tour["video"])["masks"]
  ids = [set(np.unique(m)) - {0} for m in masks]
  seen = set().union(*ids)
  at_once = max(len(i) for i in ids)
  assert len(seen) == tour["num_instances"] == len(tour["classes"])
  assert len(seen) >= 4 * at_once, (len(seen), at_once)  # Many more instances than in view.
  frames_of = {i: [f for f, present in enumerate(ids) if i in present] for i in seen}
  for i, frames in frames_of.items():
    first, last = frames[0], frames[-1]
    assert last - first < len(masks) // 2, f"object {i} stays in view for {last - first} frames"
    # It comes in and goes out over the edge: its first and last masks touch the border (unless
    # the tour starts or ends with it in view, or a nearer object hides it there).
    if 0 < first and last < len(masks) - 1:
      touches = [(_border(masks[f]) == i).any() for f in (first, last)]
      assert sum(touches) >= 1, (i, first, last)
  entered_late = sum(1 for frames in frames_of.values() if frames[0] > 0)
  left_early = sum(1 for frames in frames_of.values() if frames[-1] < len(masks) - 1)
  assert min(entered_late, left_early) >= len(seen) - 2 * at_once


def test_masks_mark_exactly_the_drawn_pixels():
  settings = dict(SMALL, size_range=(0.15, 0.6), num_classes=6)
  settings.pop("seed")
  with_objects = object_tour.ObjectTour(seed=4, **settings)
  empty = object_tour.ObjectTour(seed=4, **dict(settings, objects_at_once=0))
  checked = 0
  for f in range(0, SMALL["num_frames"], 7):
    image, mask = with_objects.frame(f)
    background, none = empty.frame(f)
    assert not none.any()
    np.testing.assert_array_equal(with_objects.frame(f, draw_objects=False)[0], background)
    difference = np.abs(image.astype(int) - background.astype(int)).max(-1)
    # A sprite's edge blends over ~1 px (alpha 1..127 counts as outside): compare beyond it,
    # and at the frame's edge, where only such a blended rim may be left of an object, allow
    # at most a half blend.
    near = ndimage.binary_dilation(mask > 0, iterations=2)
    rim = np.ones_like(near)
    rim[2:-2, 2:-2] = False
    assert not difference[~near & ~rim].any(), f"frame {f}: pixels changed outside every mask"
    assert difference[~near].max(initial=0) <= 128
    if mask.any():
      assert (difference[mask > 0] > 0).mean() > 0.9
      checked += 1
  assert checked >= 20


def test_sizes_kinds_and_backgrounds_vary(tour):
  truth = synthetic.load_masks(tour["video"])
  masks, classes = truth["masks"], truth["classes"]
  # The largest visible area of each object that crossed in full (its side squared, at most).
  areas = np.array([max((m == i).sum() for m in masks) for i in range(1, len(classes) + 1)])
  sides = np.sqrt(areas[areas > 0])
  assert np.percentile(sides, 90) > 2 * np.percentile(sides, 10), sides
  counts = np.bincount(classes, minlength=6)
  assert counts.max() - counts.min() <= 1, counts  # The six kinds in balanced turns.
  assert list(truth["class_names"]) == list(synthetic.CLASS_NAMES)
  backgrounds = truth["backgrounds"]
  assert backgrounds.shape == (SMALL["num_frames"],)
  assert len(set(backgrounds)) >= SMALL["num_frames"] // SMALL["frames_per_background"]
  assert list(truth["background_names"]) == list(object_tour.BACKGROUND_IMAGES)
  assert len(object_tour.BACKGROUND_IMAGES) > 12  # Many more than the demo's 6 photos.


def test_same_seed_same_files_other_seed_other_tour(tour, tmp_path):
  again = object_tour.generate_object_tour(str(tmp_path / "again.mp4"), **SMALL)
  for key in ("video", "masks"):
    with open(tour[key], "rb") as a, open(again[key], "rb") as b:
      assert a.read() == b.read(), f"{key} differs for the same seed"
  other = object_tour.generate_object_tour(str(tmp_path / "other.mp4"),
                                           **dict(SMALL, seed=5, num_frames=20))
  first = synthetic.load_masks(tour["video"])["masks"][:20]
  assert not np.array_equal(first, synthetic.load_masks(other["video"])["masks"])


def test_many_objects_get_wide_mask_ids(tmp_path):
  tour = object_tour.ObjectTour(num_frames=600, width=32, height=32, fps=30, objects_at_once=30,
                                size_range=(0.2, 0.4), num_classes=6, frames_per_background=100,
                                seed=0)
  assert len(tour.objects) > 255 and tour.mask_dtype == np.uint16
  with pytest.raises(ValueError, match="size_range"):
    object_tour.generate_object_tour(str(tmp_path / "x.mp4"), size_range=(0.5, 0.2))
