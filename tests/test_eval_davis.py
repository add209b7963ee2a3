"""DAVIS: J and F on hand-computed cases, label propagation against a NumPy loop, end to end."""
import os

import av
from flax import nnx
import numpy as np
from PIL import Image
import pytest

from dora_jax.data import synthetic
from dora_jax.evaluation import davis
from dora_jax.evaluation import propagation
from dora_jax.models import vit


def _square(top_left, size=10, shape=(20, 20)):
  mask = np.zeros(shape, bool)
  mask[top_left[0]:top_left[0] + size, top_left[1]:top_left[1] + size] = True
  return mask


def test_boundary_of_a_square_is_the_outline_half_a_pixel_towards_the_origin():
  # A 10 x 10 square at rows/cols 5..14 -> the outline of rows/cols 4..14 (11 x 11, 40 pixels).
  expected = np.zeros((20, 20), bool)
  expected[4, 4:15] = expected[14, 4:15] = expected[4:15, 4] = expected[4:15, 14] = True
  np.testing.assert_array_equal(davis.boundary_map(_square((5, 5))), expected)


def test_region_and_boundary_scores_of_hand_computed_cases():
  truth = _square((5, 5))  # 20 x 20 image: tolerance ceil(0.008 * 28.3) = 1 pixel (a cross).
  empty = np.zeros_like(truth)
  assert davis.region_similarity(truth, truth) == 1 and davis.boundary_f_measure(truth, truth) == 1
  assert davis.region_similarity(truth, empty) == 0 and davis.boundary_f_measure(truth, empty) == 0
  assert davis.region_similarity(empty, empty) == 1 and davis.boundary_f_measure(empty, empty) == 1
  # Shifted one pixel diagonally: 9 x 9 = 81 pixels shared of 119. Every boundary pixel has one of
  # the other outline within the cross except the far corners (15, 15) and (4, 4), at sqrt(2):
  # precision = recall = 39 / 40.
  shifted = _square((6, 6))
  assert davis.region_similarity(truth, shifted) == pytest.approx(81 / 119)
  assert davis.boundary_f_measure(truth, shifted) == pytest.approx(39 / 40)
  # Shifted three pixels right: 70 of 130 shared; of each outline's 40 pixels, the 2 x 9 on the
  # shared rows plus 2 corners of the near column match: precision = recall = F = 20 / 40.
  far = _square((5, 8))
  assert davis.region_similarity(truth, far) == pytest.approx(70 / 130)
  assert davis.boundary_f_measure(truth, far) == pytest.approx(0.5)
  # With a tolerance of 3 pixels every boundary pixel is matched.
  assert davis.boundary_f_measure(truth, far, bound_th=3) == 1


def test_sequence_scores_leave_out_the_first_and_last_frames():
  truth = np.zeros((5, 20, 20), np.uint8)
  truth[:, 2:8, 2:8] = 1
  truth[:, 10:18, 10:18] = 2
  prediction = truth.copy()
  prediction[0] = prediction[-1] = 0  # Wrong only where the evaluation does not look.
  assert davis.sequence_scores(truth, prediction) == {1: {"J": 1.0, "F": 1.0},
                                                      2: {"J": 1.0, "F": 1.0}}
  prediction[2][prediction[2] == 2] = 0  # Object 2 lost in one of the three scored frames.
  scores = davis.sequence_scores(truth, prediction)
  assert scores[1] == {"J": 1.0, "F": 1.0}
  assert scores[2]["J"] == pytest.approx(2 / 3) and scores[2]["F"] == pytest.approx(2 / 3)


def reference_propagation(features, first_labels, grid, n_last, radius, topk, temperature):
  """DINO's algorithm with a Python list as the queue, float64, one target patch at a time."""
  features = features / np.linalg.norm(features, axis=-1, keepdims=True)
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  queue, out = [], []
  for t in range(1, len(features)):
    sources = [(features[0], first_labels)] + queue
    labels = np.zeros_like(first_labels)
    for m in range(len(rows)):
      near = (np.abs(rows - rows[m]) <= radius) & (np.abs(cols - cols[m]) <= radius)
      weights = np.concatenate([np.exp(f @ features[t][m] / temperature) * near for f, _ in sources])
      source_labels = np.concatenate([l for _, l in sources])
      kth = np.sort(weights)[-topk]
      weights = np.where(weights >= kth, weights, 0)
      labels[m] = weights @ source_labels / weights.sum()
    out.append(labels)
    queue.append((features[t], labels))
    if len(queue) > n_last:
      queue.pop(0)
  return np.stack(out)


def test_propagation_matches_a_numpy_loop():
  rng = np.random.default_rng(0)
  grid, frames, dim, classes = (3, 4), 6, 8, 3
  features = rng.normal(size=(frames, 12, dim))
  first = np.eye(classes)[rng.integers(0, classes, size=12)]
  for radius in (1, 0):  # 0: no spatial restriction.
    expected = reference_propagation(features, first, grid, n_last=2,
                                     radius=radius if radius else 99, topk=3, temperature=0.1)
    got = propagation.propagate(features.astype(np.float32), first.astype(np.float32),
                                grid=grid, radius=radius, n_last_frames=2, topk=3,
                                temperature=0.1, tile=2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.sum(got, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("grid, radius, tile, n_last, topk", [
    ((5, 7), 1, 2, 2, 3),  # Blocks that overhang the grid on the bottom and the right.
    ((6, 9), 2, 3, 3, 5),  # Blocks that tile the grid exactly.
    ((7, 4), 2, 8, 1, 4),  # One block larger than the grid.
    ((9, 6), 3, 4, 7, 40),  # The queue never fills; top-k larger than some windows.
    ((4, 4), 3, 2, 2, 3),  # A window that covers the grid: every patch, as radius 0.
    ((5, 7), 0, 2, 2, 3),
])
def test_windowed_propagation_equals_the_dense_affinities(grid, radius, tile, n_last, topk):
  rng = np.random.default_rng(grid[0] * 10 + radius)
  num_patches = grid[0] * grid[1]
  features = rng.normal(size=(6, num_patches, 8)).astype(np.float32)
  first = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=num_patches)]
  settings = dict(grid=grid, radius=radius, n_last_frames=n_last, topk=topk, temperature=0.07)
  windowed = propagation.propagate(features, first, tile=tile, **settings)
  dense = propagation.propagate_dense(features, first, **settings)
  assert windowed.shape == (5, num_patches, 3)
  np.testing.assert_allclose(windowed, dense, rtol=1e-5, atol=1e-6)
  # The window matters: the labels differ from those with every patch a source.
  if 0 < radius < max(grid) - 1:
    everywhere = propagation.propagate_dense(features, first, **dict(settings, radius=0))
    assert np.abs(np.asarray(everywhere) - np.asarray(dense)).max() > 1e-2


def bilinear_upsample(maps, factor):
  """F.interpolate(scale_factor=factor, mode='bilinear', align_corners=False) per channel."""

  def axis_weights(size):
    source = np.clip((np.arange(size * factor) + 0.5) / factor - 0.5, 0, None)
    low = np.minimum(np.floor(source).astype(int), size - 1)
    high = np.minimum(low + 1, size - 1)
    weights = np.zeros((size * factor, size))
    np.add.at(weights, (np.arange(size * factor), low), 1 - (source - low))
    np.add.at(weights, (np.arange(size * factor), high), source - low)
    return weights

  rows, cols = axis_weights(maps.shape[1]), axis_weights(maps.shape[2])
  return np.einsum("oh,pw,chw->cop", rows, cols, maps)


def test_soft_labels_become_pixels_as_dino_upsamples_them():
  rng = np.random.default_rng(1)
  soft = rng.uniform(size=(2, 12, 3)).astype(np.float32)  # (T, N, C), grid 3 x 4.
  soft[1, :, 2] = 0.0  # A channel with no mass stays out of the rescaling.
  got = np.asarray(propagation.soft_labels_to_pixels(soft, grid=(3, 4), patch_size=4))
  for frame in range(2):
    maps = bilinear_upsample(soft[frame].T.reshape(3, 3, 4).astype(np.float64), 4)
    for channel in maps:
      if channel.max() > 0:
        channel -= channel.min()
        channel /= channel.max()
    np.testing.assert_array_equal(got[frame], np.argmax(maps, axis=0))


def _write_davis(root, sequences, num_frames=5):
  """A DAVIS-2017 layout from synthetic tours: JPEG frames, palette PNG annotations, val.txt."""
  palette = davis.default_palette()
  root.mkdir()
  for seed, name in enumerate(sequences):
    info = synthetic.generate_walking_tour(str(root / f"{name}.mp4"), num_frames=num_frames,
                                           width=96, height=48, fps=5, num_objects=2,
                                           seed=seed + 1)
    masks = synthetic.load_masks(info["video"])["masks"]
    with av.open(info["video"]) as container:
      frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    images = root / "JPEGImages" / "480p" / name
    annotations = root / "Annotations" / "480p" / name
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for i, (frame, mask) in enumerate(zip(frames, masks)):
      Image.fromarray(frame).save(images / f"{i:05d}.jpg", quality=95)
      davis.write_indexed_png(str(annotations / f"{i:05d}.png"), mask, palette)
  (root / "ImageSets" / "2017").mkdir(parents=True)
  (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(sequences) + "\n")
  return root


def test_end_to_end_on_a_davis_layout_of_the_synthetic_tour(tmp_path):
  root = _write_davis(tmp_path / "DAVIS", ["tour-a", "tour-b"])
  out = tmp_path / "out"
  model = vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                                rngs=nnx.Rngs(0))
  # 48 x 96 frames -> 32 x 64 (a 4 x 8 patch grid); masks back at 48 x 96.
  settings = davis.PropagationSettings(short_side=32, n_last_frames=2)
  report = davis.evaluate_davis(model, str(root), str(out), settings=settings, batch_size=2,
                                progress=False)
  # The masks and pictures; the report is dora-eval's to write (cli/eval.py).
  assert set(os.listdir(out)) == {"tour-a", "tour-b", "pictures"}
  assert report["num_objects"] > 0 and set(report["sequences"]) == {"tour-a", "tour-b"}
  for name in ("tour-a", "tour-b"):
    written = sorted(os.listdir(out / name))
    assert written == [f"{i:05d}.png" for i in range(5)]
    truth = np.stack([davis.read_annotation(str(root / "Annotations" / "480p" / name / f))[0]
                      for f in written])
    predicted = []
    for f in written:
      with Image.open(out / name / f) as image:
        assert image.mode == "P" and image.size == (96, 48)
        assert image.getpalette()[:30] == davis.default_palette().ravel()[:30].tolist()
        predicted.append(np.asarray(image))
    predicted = np.stack(predicted)
    np.testing.assert_array_equal(predicted[0], truth[0])  # Frame 0 is the given annotation.
    assert set(np.unique(predicted)) <= set(range(int(truth[0].max()) + 1))
    # The JSON holds the DAVIS scores of what was written.
    scores = davis.sequence_scores(truth, predicted)
    sequence = report["sequences"][name]
    assert sequence["objects"] == {str(k): v for k, v in scores.items()}
    assert sequence["J&F"] == pytest.approx((sequence["J"] + sequence["F"]) / 2)
    with Image.open(out / "pictures" / f"{name}.png") as picture:
      assert picture.size[1] == 160
  for key in ("J&F", "J", "F"):
    assert 0 <= report[key] <= 1
  objects = [o for s in report["sequences"].values() for o in s["objects"].values()]
  assert report["num_objects"] == len(objects) >= 2
  assert report["J"] == pytest.approx(np.mean([o["J"] for o in objects]))


def test_layout_errors_name_what_is_missing(tmp_path):
  with pytest.raises(davis.DavisError, match="does not exist"):
    davis.list_sequences(str(tmp_path / "nowhere"))
  root = tmp_path / "DAVIS"
  (root / "JPEGImages" / "480p" / "seq").mkdir(parents=True)
  (root / "Annotations" / "480p" / "seq").mkdir(parents=True)
  with pytest.raises(davis.DavisError, match=r"ImageSets/2017/val.txt does not exist"):
    davis.list_sequences(str(root))
  with pytest.raises(davis.DavisError, match="sequence 'seq' has no frames"):
    davis.list_sequences(str(root), ["seq"])
  Image.new("RGB", (8, 8)).save(root / "JPEGImages" / "480p" / "seq" / "00000.jpg")
  with pytest.raises(davis.DavisError, match="no first-frame annotation .*seq/00000.png"):
    davis.list_sequences(str(root), ["seq"])


def test_features_that_name_their_position_propagate_a_still_video_exactly(tmp_path):
  """A backbone whose patch token is the one-hot of its grid position, on a video that does not
  move: every patch finds itself in the sources, so every frame gets the first frame's labels at
  patch resolution, then upsampled as DINO does (bilinear, so convex corners are rounded off)."""
  root = tmp_path / "DAVIS"
  for sub in ("JPEGImages", "Annotations"):
    (root / sub / "480p" / "still").mkdir(parents=True)
  labels = np.zeros((32, 64), np.uint8)  # Objects on whole patches of a 4 x 8 grid of 8 px.
  labels[8:24, 8:32] = 1
  labels[0:16, 40:64] = 2
  frame = np.random.default_rng(0).integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
  for i in range(4):
    Image.fromarray(frame).save(root / "JPEGImages" / "480p" / "still" / f"{i:05d}.jpg")
    davis.write_indexed_png(str(root / "Annotations" / "480p" / "still" / f"{i:05d}.png"), labels,
                            davis.default_palette())

  def position_backbone(images):
    return {"tokens": np.eye(32, dtype=np.float32)[None].repeat(images.shape[0], axis=0)}

  report = davis.evaluate_davis(position_backbone, str(root), str(tmp_path / "out"),
                                sequences=["still"], settings=davis.PropagationSettings(
                                    short_side=32, n_last_frames=2), progress=False)
  one_hot = np.eye(3)[labels[::8, ::8]].transpose(2, 0, 1)  # (C, 4, 8)
  expected = np.argmax(bilinear_upsample(one_hot, 8), axis=0)
  assert 0 < np.sum(expected != labels) < 50  # Only pixels at the 5 convex corners change.
  written = []
  for i in range(4):
    with Image.open(tmp_path / "out" / "still" / f"{i:05d}.png") as image:
      written.append(np.asarray(image))
  np.testing.assert_array_equal(written[0], labels)
  for predicted in written[1:]:
    np.testing.assert_array_equal(predicted, expected)
  j = [davis.region_similarity(labels == obj, expected == obj) for obj in (1, 2)]
  assert report["J"] == pytest.approx(np.mean(j)) and 0.9 < report["J"] < 1
