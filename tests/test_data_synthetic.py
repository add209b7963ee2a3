"""The synthetic walking tour: masks mark exactly where objects were drawn; demo data made once,
byte for byte the same in every process."""
import os
import shutil
import subprocess
import sys

import av
import numpy as np
from scipy import ndimage

from dora_jax.data import manifest as manifest_lib
from dora_jax.data import synthetic


def _decode(path):
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)


def test_masks_mark_where_the_objects_are(tmp_path):
  kwargs = dict(num_frames=12, width=64, height=48, fps=10, seed=3)
  with_objects = synthetic.generate_walking_tour(str(tmp_path / "objects.mp4"), num_objects=3,
                                                 **kwargs)
  background = synthetic.generate_walking_tour(str(tmp_path / "empty.mp4"), num_objects=0,
                                                **kwargs)
  truth = synthetic.load_masks(with_objects["video"])
  masks = truth["masks"]
  assert masks.shape == (12, 48, 64) and set(np.unique(masks)) <= {0, 1, 2, 3}
  assert sorted(truth["classes"]) == [0, 1, 2]  # K=3 objects: one of each class.
  assert list(truth["class_names"]) == list(synthetic.CLASS_NAMES[:3])
  for i in (1, 2, 3):  # Every object is seen, and moves.
    assert (masks == i).any(axis=(1, 2)).sum() >= 6
  centres = [np.argwhere(masks[f] == 1).mean(0) for f in (0, 11) if (masks[f] == 1).any()]
  assert len(centres) < 2 or np.abs(centres[0] - centres[1]).max() > 1

  # Independent check: the same seed without objects renders the same camera path, so the two
  # videos differ inside the masks and agree (up to H.264) outside them.
  difference = np.abs(_decode(with_objects["video"]) - _decode(background["video"])).mean(-1)
  near = ndimage.binary_dilation(masks > 0, structure=np.ones((1, 5, 5)))  # H.264 blurs edges.
  inside, outside = difference[masks > 0], difference[~near]
  assert outside.mean() < 5 and inside.mean() > 8 * outside.mean()
  assert np.all(synthetic.load_masks(background["video"])["masks"] == 0)


def test_blank_frames_are_constant_and_maskless(tmp_path):
  info = synthetic.generate_walking_tour(str(tmp_path / "b.mp4"), num_frames=6, width=32,
                                         height=32, fps=5, num_objects=2, seed=0,
                                         blank_frames=(2, 3))
  frames = _decode(info["video"])
  truth = synthetic.load_masks(info["video"])
  assert list(truth["blank"]) == [False, False, True, True, False, False]
  assert frames[2].std() < 1 and frames[0].std() > 10
  assert not truth["masks"][2:4].any()


def test_demo_data_is_made_once_and_reused(tmp_path):
  small = dict(num_frames=20, width=64, height=48, short_side=48, frames_per_shard=8)
  data_dir = synthetic.ensure_demo_data(str(tmp_path), **small)
  manifest = manifest_lib.load(data_dir)
  assert manifest["videos"][0]["complete"] and manifest["videos"][0]["num_frames"] == 20
  stamps = {n: os.stat(os.path.join(data_dir, n)).st_mtime_ns for n in os.listdir(data_dir)}
  assert synthetic.ensure_demo_data(str(tmp_path), **small) == data_dir
  assert stamps == {n: os.stat(os.path.join(data_dir, n)).st_mtime_ns
                    for n in os.listdir(data_dir)}
  synthetic.ensure_demo_data(str(tmp_path), **dict(small, num_frames=16))  # Other spec: remade.
  assert manifest_lib.load(data_dir)["videos"][0]["num_frames"] == 16


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder):
  """{relative path: bytes} of every file under `folder` (the lock file aside)."""
  out = {}
  for directory, _, names in os.walk(folder):
    for name in names:
      if name != ".lock":
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, folder)] = f.read()
  return out


def test_demo_data_bytes_are_the_same_in_two_processes(tmp_path):
  # The same command twice, each in a fresh process (the encoder's threads, hash seeds and
  # allocation differ between processes): video, masks, shards, indexes and manifest must be
  # identical. The second run writes to the same path, as the manifest records the video's path.
  out = tmp_path / "demo"

  def generate(seed):
    subprocess.run(
        [sys.executable, "-m", "dora_jax.data.synthetic", "--out", str(out), "--num_frames", "40",
         "--width", "96", "--height", "64", "--short_side", "64", "--seed", str(seed)],
        check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    files = _files(out)
    shutil.rmtree(out)
    return files

  first, second = generate(0), generate(0)
  assert {"walking_tour.mp4", "walking_tour.masks.npz", "shards/manifest.json",
          "shards/walking_tour-00000.tfrecord"} <= set(first)
  assert sorted(first) == sorted(second)
  for name in first:
    assert first[name] == second[name], f"{name} differs between two runs of the same command"
  other = generate(1)  # Not vacuous: another seed gives another video.
  assert other["walking_tour.mp4"] != first["walking_tour.mp4"]


def test_six_kinds_each_drawn_with_its_own_shape(tmp_path):
  info = synthetic.generate_walking_tour(str(tmp_path / "six.mp4"), num_frames=2, width=64,
                                         height=48, num_objects=6, num_classes=6, seed=5)
  truth = synthetic.load_masks(info["video"])
  assert sorted(truth["classes"]) == list(range(6))
  assert list(truth["class_names"]) == list(synthetic.CLASS_NAMES)
  # The kinds' silhouettes differ: no two cover the same pixels (IoU under 0.9).
  shapes = [np.asarray(synthetic._silhouette(c, 64)) > 127 for c in range(6)]
  for i in range(6):
    for j in range(i):
      iou = (shapes[i] & shapes[j]).sum() / (shapes[i] | shapes[j]).sum()
      assert iou < 0.9, (synthetic.CLASS_NAMES[i], synthetic.CLASS_NAMES[j], iou)


def test_object_views_are_split_by_instance():
  kwargs = dict(num_classes=4, instances_per_class=3, views_per_instance=2, size=32)
  first = synthetic.render_object_views(seed=1, **kwargs)
  again = synthetic.render_object_views(seed=1, **kwargs)
  other = synthetic.render_object_views(seed=2, **kwargs)
  assert first["images"].shape == (24, 32, 32, 3) and first["images"].dtype == np.uint8
  np.testing.assert_array_equal(first["labels"], np.repeat(np.arange(4), 6))
  np.testing.assert_array_equal(first["instances"], np.repeat(np.arange(12), 2))
  np.testing.assert_array_equal(first["images"], again["images"])  # Deterministic.
  assert not np.array_equal(first["images"], other["images"])  # Other seed, other instances.
  # The object sits in the middle: the centre pixels differ between two views of one instance
  # less than the corners (background windows differ, the object is the same).
  a, b = first["images"][0].astype(int), first["images"][1].astype(int)
  centre = np.abs(a[12:20, 12:20] - b[12:20, 12:20]).mean()
  corners = np.mean([np.abs(a[s] - b[s]).mean() for s in
                     [np.s_[:4, :4], np.s_[:4, -4:], np.s_[-4:, :4], np.s_[-4:, -4:]]])
  assert centre < corners, (centre, corners)


def test_object_views_name_the_photo_behind_the_object():
  kwargs = dict(num_classes=6, instances_per_class=4, views_per_instance=8, size=32)
  first = synthetic.render_object_views(seed=1, **kwargs)
  other = synthetic.render_object_views(seed=2, **kwargs)
  names = list(first["background_names"])
  assert len(names) == 6 and first["backgrounds"].dtype == np.int64
  assert set(first["backgrounds"]) == set(range(6))  # 192 views: every photo comes up.
  # Independent check: the border of a view (away from the object) shows the named photo, so
  # its colours tell the photo: a nearest-centroid rule fitted on one seed's views names the
  # photo behind another seed's views far above chance (1/6).
  def border(images):
    images = images.astype(np.float64)
    return np.concatenate([images[:, :4].mean((1, 2)), images[:, -4:].mean((1, 2)),
                           images[:, :, :4].mean((1, 2)), images[:, :, -4:].mean((1, 2))], -1)
  centroids = np.stack([border(first["images"])[first["backgrounds"] == b].mean(0)
                        for b in range(6)])
  distances = ((border(other["images"])[:, None] - centroids[None]) ** 2).sum(-1)
  accuracy = np.mean(distances.argmin(1) == other["backgrounds"])
  assert accuracy > 0.6, accuracy
