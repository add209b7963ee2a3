"""Image sources (folder, tfds without TensorFlow) and data-parallel feature extraction."""
import os

from flax import nnx
import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dora_jax.evaluation import features
from dora_jax.data import images as images_lib
from dora_jax.models import vit


def _write_folder(root, counts, size=(20, 28)):
  rng = np.random.default_rng(0)
  for name, count in counts.items():
    os.makedirs(root / name, exist_ok=True)
    for i in range(count):
      pixels = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'JPG'}")
  return root


def test_image_folder_sorts_classes_and_reads_images(tmp_path):
  root = _write_folder(tmp_path / "images", {"zebra": 2, "apple": 3})
  (root / "apple" / "notes.txt").write_text("not an image")
  source = images_lib.open_source(str(root))
  assert source.class_names == ("apple", "zebra") and source.num_classes == 2
  assert len(source) == 5
  assert [label for _, label in source.samples] == [0, 0, 0, 1, 1]
  element = source[4]
  assert element["image"].shape == (20, 28, 3) and element["image"].dtype == np.uint8
  assert element["label"] == 1


def test_image_folder_errors_name_the_problem(tmp_path):
  with pytest.raises(images_lib.SourceError, match="missing does not exist"):
    images_lib.open_source(str(tmp_path / "missing"))
  (tmp_path / "flat").mkdir()
  Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
  with pytest.raises(images_lib.SourceError, match="has no class subfolders"):
    images_lib.open_source(str(tmp_path / "flat"))
  _write_folder(tmp_path / "some", {"cat": 1})
  (tmp_path / "some" / "dog").mkdir()
  with pytest.raises(images_lib.SourceError, match=r"class folder .*dog has no images"):
    images_lib.open_source(str(tmp_path / "some"))


def test_tfds_source_reads_a_mocked_dataset():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = images_lib.open_source("tfds:imagenette/160px:train")
    assert len(source) == 6 and source.num_classes == 10
    assert source.name == "tfds:imagenette/160px:train"
    for i in range(6):
      image, label = source[i]["image"], source[i]["label"]
      assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
      assert 0 <= label < 10
    grey = images_lib.open_source("tfds:mnist:test")  # (28, 28, 1) images -> RGB.
    assert grey[0]["image"].shape == (28, 28, 3) and len(grey.class_names) == 10


def test_tfds_errors_are_one_line():
  with pytest.raises(images_lib.SourceError, match="tfds has no dataset 'no_such_dataset'"):
    images_lib.open_source("tfds:no_such_dataset:train")
  with pytest.raises(images_lib.SourceError, match="expected tfds:NAME:SPLIT"):
    images_lib.open_source("tfds:imagenette")


def _tiny_vit(seed=0):
  return vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                               rngs=nnx.Rngs(seed))


def test_features_over_four_devices_equal_a_direct_call(tmp_path):
  assert jax.local_device_count() == 4  # conftest.py
  source = images_lib.open_source(str(_write_folder(tmp_path / "images",
                                                       {"a": 3, "b": 2, "c": 2})))
  model = _tiny_vit()
  # Batch 5 -> 8 (two per device); 7 images: a full batch and a padded one.
  feats, labels = features.extract_features(model, source, batch_size=5, resize_size=20,
                                            crop_size=16, progress=False)
  crops = np.stack([images_lib.eval_view(source[i]["image"], resize_size=20, crop_size=16)
                    for i in range(len(source))])
  expected = model(vit.normalize_images(crops))["cls"]
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 2])
  # The preprocessed path of the periodic evaluator gives the same.
  images, same_labels = features.load_preprocessed(source, resize_size=20, crop_size=16)
  np.testing.assert_array_equal(images, crops)
  encoder = features.Encoder(model, ("cls",))
  again, _ = features.embed_batches(encoder, features.array_batches(images, same_labels, 8),
                                    total=7, batch_size=8, progress=False)
  np.testing.assert_allclose(again, feats, rtol=1e-6, atol=1e-6)


def test_any_function_of_images_is_a_backbone(tmp_path):
  source = images_lib.open_source(str(_write_folder(tmp_path / "images", {"a": 2, "b": 3})))
  mean_colour = lambda images: {"cls": images.mean(axis=(1, 2)), "unused": images}
  feats, labels = features.extract_features(mean_colour, source, batch_size=2, resize_size=20,
                                            crop_size=16, progress=False)
  crops = np.stack([images_lib.eval_view(source[i]["image"], resize_size=20, crop_size=16)
                    for i in range(len(source))]).astype(np.float64)
  expected = (crops / 255 - np.asarray(vit.PIXEL_MEAN)) / np.asarray(vit.PIXEL_STD)
  np.testing.assert_allclose(feats, expected.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
