"""dora_jax.data.images: DINO's evaluation view, the same pixels for k-NN and dora-finetune."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dora_jax.data import images as images_lib
from dora_jax.evaluation import features
from dora_jax.finetune import data as finetune_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_view_rounds_as_torchvision():
  image = np.random.default_rng(0).integers(0, 256, size=(40, 63, 3), dtype=np.uint8)
  out = images_lib.eval_view(image, resize_size=20, crop_size=16)
  # torchvision: the longer side int(20 * 63 / 40) = int(31.5) = 31; crop offsets
  # round((20 - 16) / 2) = 2 and round((31 - 16) / 2) = round(7.5) = 8; bicubic through PIL.
  resized = np.asarray(Image.fromarray(image).resize((31, 20), Image.BICUBIC))
  np.testing.assert_array_equal(out, resized[2:18, 8:24])
  portrait = images_lib.eval_view(image.transpose(1, 0, 2), resize_size=20, crop_size=16)
  expected = np.asarray(Image.fromarray(image.transpose(1, 0, 2)).resize((20, 31), Image.BICUBIC))
  np.testing.assert_array_equal(portrait, expected[8:24, 2:18])
  with pytest.raises(ValueError, match=r"resize_size \(8\) must be at least crop_size \(16\)"):
    images_lib.eval_view(image, resize_size=8, crop_size=16)


def test_knn_and_finetune_validation_views_are_the_same_pixels(tmp_path):
  rng = np.random.default_rng(1)
  sizes = [(40, 63), (63, 40), (33, 47), (32, 32), (51, 37)]  # Odd sides: rounding matters.
  for i, size in enumerate(sizes):
    os.makedirs(tmp_path / f"c{i % 2}", exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=size + (3,), dtype=np.uint8)).save(
        tmp_path / f"c{i % 2}" / f"{i}.png")
  source = images_lib.open_source(str(tmp_path))
  knn_images, knn_labels = features.load_preprocessed(source, resize_size=32, crop_size=16)
  config = finetune_data.ViewConfig(image_size=16, val_crop_fraction=0.5)  # Short side 32.
  batch = next(finetune_data.eval_batches(source, config, global_batch_size=len(sizes)))
  np.testing.assert_array_equal(batch["image"], knn_images)
  np.testing.assert_array_equal(batch["label"], knn_labels)
  assert batch["valid"].tolist() == [1] * len(sizes)


def test_sources_do_not_import_jax():
  """dora-finetune's grain workers read the sources: the module must not pull in jax itself."""
  code = ("import sys; import dora_jax.data.images; "
          "sys.exit(any(name.split('.')[0] in ('jax', 'flax') for name in sys.modules))")
  env = dict(os.environ, PYTHONPATH=REPO)
  assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_source_errors_are_value_errors(tmp_path):
  with pytest.raises(ValueError, match="image source is empty"):
    images_lib.open_source("")
  with pytest.raises(images_lib.SourceError, match="missing does not exist"):
    images_lib.open_source(str(tmp_path / "missing"))
