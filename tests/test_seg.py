"""mIoU as mmseg, the ADE label shift, the sources, the crops, and the linear readout learning."""
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dora_jax.evaluation import seg
from dora_jax.evaluation import seg_data


def _metrics(pairs, num_classes):
  totals = np.zeros((3, num_classes), np.int64)
  for prediction, labels in pairs:
    intersect, union, _, area = seg.intersect_and_union(np.asarray(prediction),
                                                        np.asarray(labels), num_classes)
    totals += np.stack([intersect, union, area])
  return seg.mean_iou(*totals)


def test_perfect_prediction_is_100():
  labels = np.array([[0, 1], [2, 2]])
  metrics = _metrics([(labels, labels)], 3)
  assert metrics["mIoU"] == metrics["aAcc"] == metrics["mAcc"] == 100.0


def test_known_confusion_and_ignored_pixels():
  # Class 0: pred {a, b}, true {a, c} -> I 1, U 3; class 1: pred {c, d}, true {b, d} -> I 1, U 3;
  # the pixel labelled 255 is predicted 1 but does not count anywhere.
  prediction = np.array([0, 0, 1, 1, 1])
  labels = np.array([0, 1, 0, 1, 255])
  metrics = _metrics([(prediction, labels)], 2)
  assert metrics["IoU"] == pytest.approx([100 / 3, 100 / 3])
  assert metrics["mIoU"] == pytest.approx(100 / 3)
  assert metrics["aAcc"] == pytest.approx(50.0)
  assert metrics["mAcc"] == pytest.approx(50.0)


def test_sums_over_the_set_before_dividing_and_leaves_absent_classes_out():
  # Image 1: class 0 right on 1 pixel of 1; image 2: class 0 wrong (predicted 1) on 3 of 3.
  # Set-level IoU of class 0: 1 / 4 (a mean of per-image IoUs would say (1 + 0) / 2).
  # Class 2 is never labelled nor predicted: left out of the mean.
  metrics = _metrics([([0], [0]), ([1, 1, 1], [0, 0, 0])], 3)
  assert metrics["IoU"][0] == pytest.approx(25.0)
  assert metrics["IoU"][1] == 0.0 and metrics["IoU"][2] is None
  assert metrics["mIoU"] == pytest.approx(12.5)
  assert metrics["mAcc"] == pytest.approx(25.0)  # Class 1 has no labelled pixels.


def test_ade_label_shift():
  labels = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
  np.testing.assert_array_equal(seg_data.reduce_zero_label(labels),
                                [[255, 0, 1], [149, 255, 6]])
  np.testing.assert_array_equal(seg_data.to_dataset_labels(np.array([0, 149])), [1, 150])


def _write_ade(root, split, images, labels):
  for sub in ("images", "annotations"):
    os.makedirs(os.path.join(root, sub, split), exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    Image.fromarray(image).save(os.path.join(root, "images", split, f"img{i}.jpg"), quality=95)
    Image.fromarray(label).save(os.path.join(root, "annotations", split, f"img{i}.png"))


def test_ade_folder_reads_and_checks(tmp_path):
  image = np.zeros((12, 16, 3), np.uint8)
  label = np.arange(12 * 16).reshape(12, 16).astype(np.uint8) % 4
  _write_ade(str(tmp_path), "training", [image], [label])
  source = seg_data.ADE20KFolder(str(tmp_path), "training", num_classes=3)
  pixels, labels = source[0]
  assert pixels.shape == (12, 16, 3) and source.names == ["img0"]
  np.testing.assert_array_equal(labels, np.where(label == 0, 255, label - 1))
  with pytest.raises(seg_data.SegError, match="has label 3 but the set has 2 classes"):
    seg_data.ADE20KFolder(str(tmp_path), "training", num_classes=2)[0]
  os.makedirs(tmp_path / "images" / "validation")
  with pytest.raises(seg_data.SegError, match="no annotations/validation folder"):
    seg_data.ADE20KFolder(str(tmp_path), "validation")
  os.remove(tmp_path / "annotations" / "training" / "img0.png")
  with pytest.raises(seg_data.SegError, match="img0.jpg has no annotation"):
    seg_data.ADE20KFolder(str(tmp_path), "training")


def test_example_source_maps_tfds_features():
  """What `open_seg_source` builds on tfds.data_source: masks (H, W, 1), the ADE shift."""
  mask = np.array([[[0], [1]], [[2], [3]]], np.uint8)
  examples = [{"image": np.full((2, 2, 1), 7, np.uint8), "segmentation_mask": mask}]
  source = seg_data.ExampleSegSource(examples, "tfds:fake:train", num_classes=3)
  pixels, labels = source[0]
  assert pixels.shape == (2, 2, 3) and int(pixels.max()) == 7
  np.testing.assert_array_equal(labels, [[255, 0], [1, 2]])
  with pytest.raises(seg_data.SegError, match="no feature 'mask'"):
    seg_data.ExampleSegSource(examples, "tfds:fake:train", num_classes=3, mask_key="mask")[0]


def test_train_crop_keeps_pixels_and_labels_together():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(8, dtype=np.uint8)[None], 6, axis=0)  # Label = column // 1.
  image = np.stack([labels * 30] * 3, axis=-1).astype(np.uint8)
  for _ in range(5):
    crop, crop_labels = seg_data.train_crop(image, labels, 16, rng)
    assert crop.shape == (16, 16, 3) and crop_labels.shape == (16, 16)
    labelled = crop_labels != 255
    assert labelled.any()
    # Pixels are bilinear, labels nearest: the pixel stays within one grey step of 30 x label.
    assert np.abs(crop[..., 0][labelled].astype(int) - 30 * crop_labels[labelled]).max() <= 30
    assert (crop[~labelled] == 0).all()  # Padding.


# ---- The readout on a fake backbone whose tokens encode the class under each patch. ----

PATCH, BLOCK, SIDE, NUM_CLASSES = 8, 16, 64, 3
COLOURS = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], np.uint8)


def _block_images(count, seed):
  """Images of BLOCK x BLOCK squares of a class colour (H, W, 3) and their labels (H, W) (the
  logits' bilinear upsampling blurs class edges: a square of 2 x 2 patches leaves a readout
  that is right on every patch above 95 mIoU)."""
  rng = np.random.default_rng(seed)
  grid = rng.integers(0, NUM_CLASSES, (count, SIDE // BLOCK, SIDE // BLOCK))
  labels = np.kron(grid, np.ones((1, BLOCK, BLOCK), np.int64)).astype(np.uint8)
  return COLOURS[labels], labels


def fake_backbone(images, num_last_blocks=1):
  """Patch tokens = the patch's mean (normalised) colour: a linear code of its class."""
  batch, height, width, _ = images.shape
  pooled = images.reshape(batch, height // PATCH, PATCH, width // PATCH, PATCH, 3).mean((2, 4))
  tokens = pooled.reshape(batch, -1, 3)
  return {"block_tokens": jnp.stack([tokens] * num_last_blocks, axis=1)}


class _Arrays:
  def __init__(self, images, labels):
    self.images, self.labels = images, labels
    self.name, self.num_classes, self.class_names = "arrays", NUM_CLASSES, ["r", "g", "b"]
    self.names = [f"{i}" for i in range(len(images))]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return self.images[index], self.labels[index]


def test_readout_learns_a_linear_code(tmp_path):
  train, val = _Arrays(*_block_images(8, 0)), _Arrays(*_block_images(4, 1))
  settings = seg.SegSettings(iterations=150, batch_size=4, image_size=SIDE, blocks=2, lr=0.05,
                             num_pictures=1, num_threads=2)
  report = seg.evaluate_seg(fake_backbone, train, val, settings, out_dir=str(tmp_path),
                            progress=False)
  assert report["mIoU"] >= 95, report
  assert set(report["per_class_IoU"]) == {"r", "g", "b"}
  prediction = np.asarray(Image.open(tmp_path / "pred" / "0.png"))
  assert prediction.shape == (SIDE, SIDE) and set(np.unique(prediction)) <= {1, 2, 3}
  assert np.asarray(Image.open(tmp_path / "pictures" / "0.png")).shape == (SIDE, 3 * SIDE, 3)
  assert os.path.isdir(tmp_path / "readout")


def test_patch_features_concatenate_blocks_per_patch():
  tokens = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)  # (B, n, N, D)
  features = np.asarray(seg.patch_features(tokens))
  assert features.shape == (2, 2, 2, 15)
  np.testing.assert_array_equal(features[1, 0, 1], np.asarray(tokens)[1, :, 1].ravel())
