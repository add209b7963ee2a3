"""dora-convert on image folders and tfds splits: order, sizes, unreadable images, resume, training
one frame per clip."""
import io
import json
import os

import cv2
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dora_jax import config_base
from dora_jax.cli import convert as convert_cli
from dora_jax.data import convert
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import pipeline
from dora_jax.data import source
from dora_jax.data import synthetic
from dora_jax.data import tfrecord

# (relative path, (height, width)): two classes, sizes above and below --short-side 32.
IMAGES = {"dog/b.png": (48, 80), "cat/z.png": (20, 30), "dog/a10.png": (64, 40),
          "cat/a.png": (36, 36), "dog/a2.png": (32, 50)}


def _pixels(seed, shape):
  """A smooth, textured image (PNG is lossless; JPEG keeps it within a few levels)."""
  y, x = np.mgrid[:shape[0], :shape[1]]
  return np.stack([(127 + 100 * np.sin(x / (6 + seed) + c / 3 + y / 9)) for c in range(3)],
                  -1).astype(np.uint8)


@pytest.fixture()
def folder(tmp_path):
  root = tmp_path / "pets"
  for seed, (name, shape) in enumerate(IMAGES.items()):
    os.makedirs(root / os.path.dirname(name), exist_ok=True)
    Image.fromarray(_pixels(seed, shape)).save(root / name)
  return str(root)


def _records(out, entry_id):
  manifest = manifest_lib.load(out)
  store = source.FrameStore(out, manifest_lib.select_videos(manifest, (entry_id,), out))
  return manifest, [store.read_frame(0, i) for i in range(store.num_frames[0])]


def test_folder_images_are_frames_in_sorted_path_order_resized_like_video_frames(folder,
                                                                                  tmp_path):
  out = str(tmp_path / "shards")
  convert.convert([folder], out, short_side=32, quality=95, frames_per_shard=2, progress=False)
  manifest, records = _records(out, "pets")
  entry = manifest["videos"][0]
  order = sorted(IMAGES, key=lambda name: name.split("/"))  # cat/a, cat/z, dog/a10, dog/a2, dog/b
  assert (entry["kind"], entry["complete"], entry["num_frames"], entry["source_images"]) == (
      manifest_lib.IMAGES, True, 5, 5)
  assert [s["num_records"] for s in entry["shards"]] == [2, 2, 1]
  assert [r["frame_index"] for r in records] == list(range(5))
  seeds = {name: seed for seed, name in enumerate(IMAGES)}
  for record, name in zip(records, order):
    height, width = IMAGES[name]
    scale = min(1.0, 32 / min(height, width))  # Never upscaled.
    expected_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    assert (record["image/height"], record["image/width"]) == expected_size, name
    expected = cv2.resize(_pixels(seeds[name], IMAGES[name]), expected_size[::-1],
                          interpolation=cv2.INTER_AREA)
    stored = np.asarray(Image.open(io.BytesIO(record["image/encoded"])))
    assert stored.shape == expected.shape
    assert np.abs(stored.astype(int) - expected).mean() < 4, name
  # The entry's size is that of its image with the shortest side (cat/z.png, 20 x 30).
  assert (entry["height"], entry["width"]) == (20, 30)


def test_unreadable_image_is_named_and_skipped_the_rest_kept_exit_1(folder, tmp_path, capsys):
  bad = os.path.join(folder, "cat", "b.png")  # Sorted second: cat/a, cat/b, cat/z, dog/...
  open(bad, "wb").write(b"not a png")
  out = str(tmp_path / "shards")
  assert convert_cli.main([folder, "--out", out, "--short-side", "32", "--no-progress"]) == 1
  err = capsys.readouterr().err
  assert f"image '{bad}' cannot be read" in err and "skipped" in err
  manifest, records = _records(out, "pets")
  entry = manifest["videos"][0]
  assert (entry["complete"], entry["num_frames"], entry["frames_unreadable"]) == (True, 5, 1)
  assert entry["unreadable"] == [[1, bad]]
  assert [r["frame_index"] for r in records] == [0, 2, 3, 4, 5]


def test_empty_folder_is_an_error_naming_it_and_other_inputs_are_converted(folder, tmp_path,
                                                                           capsys):
  empty = tmp_path / "empty"
  (empty / "cls").mkdir(parents=True)
  (empty / "cls" / "notes.txt").write_text("no images here")
  out = str(tmp_path / "shards")
  assert convert_cli.main([str(empty), folder, "--out", out, "--no-progress"]) == 1
  err = capsys.readouterr().err
  assert f"image folder '{empty}' has no images" in err
  manifest = manifest_lib.load(out)
  assert [(v["id"], v["complete"]) for v in manifest["videos"]] == [("pets", True)]


def test_interrupted_conversion_resumes_to_the_same_shards(folder, tmp_path, monkeypatch):
  reference = str(tmp_path / "reference")
  convert.convert([folder], reference, short_side=32, frames_per_shard=2, progress=False)
  out = str(tmp_path / "out")
  encode, calls = tfrecord.encode_frame, []

  def interrupted(**kwargs):
    calls.append(1)
    if len(calls) > 3:  # Killed while writing the second shard.
      raise KeyboardInterrupt
    return encode(**kwargs)

  monkeypatch.setattr(tfrecord, "encode_frame", interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert.convert([folder], out, short_side=32, frames_per_shard=2, progress=False)
  monkeypatch.setattr(tfrecord, "encode_frame", encode)
  assert sorted(os.listdir(out)) == ["manifest.json", "pets-00000.tfrecord",
                                     "pets-00000.tfrecord.idx"]  # Nothing half-written.
  assert not manifest_lib.all_complete(manifest_lib.read(out))
  manifest = convert.convert([folder], out, short_side=32, frames_per_shard=2, progress=False)
  expected = json.load(open(os.path.join(reference, "manifest.json")))
  assert manifest["videos"][0]["shards"] == expected["videos"][0]["shards"]
  for name in os.listdir(reference):
    if name.endswith(".tfrecord"):
      assert open(os.path.join(out, name), "rb").read() == open(
          os.path.join(reference, name), "rb").read(), name


def test_videos_image_folders_and_tfds_splits_mix_on_the_command_line(folder, tmp_path, capsys):
  video = str(tmp_path / "tour.mp4")
  synthetic.generate_walking_tour(video, num_frames=6, width=64, height=48, fps=10,
                                  num_objects=1, seed=0)
  out = str(tmp_path / "shards")
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    expected = [np.asarray(tfds.data_source("mnist", split="test")[i]["image"]) for i in range(4)]
    assert convert_cli.main([video, folder, "tfds:mnist:test", "--out", out, "--short-side", "32",
                             "--blank-threshold", "0", "--no-progress"]) == 0
  manifest = manifest_lib.load(out)
  assert [(v["id"], manifest_lib.kind(v), v["num_frames"]) for v in manifest["videos"]] == [
      ("tour", manifest_lib.VIDEO, 6), ("pets", manifest_lib.IMAGES, 5),
      ("mnist_test", manifest_lib.IMAGES, 4)]
  _, records = _records(out, "mnist_test")
  for record, image in zip(records, expected):  # (28, 28, 1) grey -> RGB, not resized.
    stored = np.asarray(Image.open(io.BytesIO(record["image/encoded"])).convert("RGB"))
    assert stored.shape == (28, 28, 3)
    assert np.abs(stored.astype(int) - np.repeat(image, 3, -1)).mean() < 8
  assert "mnist_test: 4 frames kept" in capsys.readouterr().out


def _data_config(data_dir, **overrides):
  config = config_base.dino_baseline(config_base.get_base_config()).data
  config.dir = data_dir
  config.global_size, config.local_size, config.num_local_crops = 24, 12, 2
  config.num_workers = 0
  for key, value in overrides.items():
    config[key] = value
  return config


def test_images_train_one_frame_per_clip_each_at_its_own_size(folder, tmp_path):
  out = str(tmp_path / "shards")
  convert.convert([folder], out, short_side=32, progress=False)
  config = _data_config(out)
  plan = pipeline.plan_clips(config)
  assert plan.num_clips == 5
  clips = source.ClipSource(out, plan.videos, 1, 1)
  sizes = set()
  for index in range(len(clips)):
    element = clips[index]
    decoded = np.asarray(Image.open(io.BytesIO(element["jpegs"][0])))
    assert element["size"] == decoded.shape[:2]  # The frame's own size, not the entry's.
    sizes.add(element["size"])
  assert len(sizes) > 2
  batch = next(pipeline.make_train_iterator(plan, config, batch_size=5, seed=0))
  assert batch["frames"].shape == batch["second_frames"].shape == (5, 1, 24, 24, 3)
  assert batch["crops"].shape == (5, 1, 2, 12, 12, 3)
  with pytest.raises(ValueError, match=(
      rf"'{manifest_lib.path_of(out)}' lists images, not video frames \('pets'\), and "
      r"data.frames_per_clip=2 .* use data.frames_per_clip=1 \(config_base.dino_baseline\)")):
    pipeline.plan_clips(_data_config(out, frames_per_clip=2))
