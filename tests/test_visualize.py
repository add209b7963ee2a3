"""The tracking picture: colour map, overlays, layout, PNG."""
import numpy as np
from PIL import Image
import pytest

from dora_jax.trainer import pictures


def test_colormap_endpoints_and_order():
  colors = pictures.colormap(np.array([0.0, 0.5, 1.0])).astype(int)
  np.testing.assert_array_equal(colors[0], [0, 0, 4])
  np.testing.assert_array_equal(colors[-1], [252, 255, 164])
  assert colors.sum(axis=1)[0] < colors.sum(axis=1)[1] < colors.sum(axis=1)[2]


def test_overlay_is_brightest_where_the_heat_is_and_outlines_masks():
  frames = np.zeros((2, 16, 16, 3), np.uint8)
  heat = np.zeros((2, 1, 16, 16), np.float32)
  heat[1, 0, 4:8, 4:8] = 1.0  # The object is in frame 1 only.
  masks = heat > 0.5
  overlays = pictures.heatmap_overlays(frames, heat, masks)
  assert overlays.shape == (2, 1, 16, 16, 3)
  brightness = overlays[1, 0].astype(int).sum(-1)
  assert brightness[5, 5] > brightness[12, 12]
  np.testing.assert_array_equal(overlays[1, 0, 4, 4], [255, 255, 255])  # Mask corner: outline.
  assert (overlays[0, 0].astype(int).sum(-1) < 100).all()  # Cold everywhere in frame 0.


def test_picture_layout_and_png(tmp_path):
  rng = np.random.default_rng(0)
  num_frames, k, size = 3, 2, 32
  frames = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
  heat = rng.random((num_frames, k, size, size)).astype(np.float32)
  views = rng.integers(0, 256, (num_frames, 1, size, size, 3), dtype=np.uint8)
  picture = pictures.make_picture(frames, heat, views, heat > 0.5, title="step 1")
  scale = 4  # Enlarged towards 192 px, but at most 4x: 128-px tiles.
  rows, tile = 1 + k + 1, size * scale + 2
  assert picture.shape == (16 + 14 + rows * tile, 96 + num_frames * tile, 3)
  # The first frame tile is the frame, enlarged by pixel repetition.
  top, left = 16 + 14, 96
  np.testing.assert_array_equal(picture[top:top + size * scale:scale, left:left + size * scale:scale],
                                frames[0])
  path = str(tmp_path / "p.png")
  pictures.save_picture(path, picture)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), picture)


def test_demo_frames_are_drawn_three_times_larger():
  frames = np.zeros((2, 64, 64, 3), np.uint8)
  picture = pictures.make_picture(frames, np.zeros((2, 1, 64, 64)), np.zeros((2, 1, 64, 64, 3),
                                                                             np.uint8))
  assert picture.shape == (14 + 3 * (192 + 2), 96 + 2 * (192 + 2), 3)


def test_picture_rejects_mismatched_shapes():
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="heatmaps has shape"):
    pictures.make_picture(frames, np.zeros((3, 1, 8, 8)), np.zeros((2, 1, 8, 8, 3), np.uint8))
