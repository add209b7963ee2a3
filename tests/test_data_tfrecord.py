"""TFRecord framing, CRC checks, offset indexes, and interop with TensorFlow both ways."""
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys

import crc32c
import numpy as np
from PIL import Image
import pytest

from dora_jax.data import tfrecord


def _jpeg(seed: int, size=(24, 32)) -> tuple[bytes, np.ndarray]:
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue(), image


def _write_shard(path, count=5):
  frames = []
  with tfrecord.TFRecordWriter(path) as writer:
    for i in range(count):
      jpeg, _ = _jpeg(i)
      writer.write(tfrecord.encode_frame(video_id="v", frame_index=3 * i, timestamp=0.5 * i,
                                         jpeg=jpeg, height=24, width=32))
      frames.append(jpeg)
  return frames


def test_masked_crc_matches_the_tfrecord_definition():
  # Independent: CRC32C of b"123456789" is 0xE3069283 (RFC 3720); mask as in TF's crc32c.h.
  assert crc32c.crc32c(b"123456789") == 0xE3069283
  crc = 0xE3069283
  expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  assert tfrecord.masked_crc(b"123456789") == expected
  framed = tfrecord.frame_record(b"abc")
  assert framed[:8] == struct.pack("<Q", 3) and framed[12:15] == b"abc" and len(framed) == 19


def test_random_access_through_the_index_reads_what_was_written(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  jpegs = _write_shard(path)
  offsets, sizes = tfrecord.read_index(path)
  walked = tfrecord.build_index(path)
  np.testing.assert_array_equal(offsets, walked[0])
  np.testing.assert_array_equal(sizes, walked[1])
  reader = tfrecord.ShardReader(path)
  for i in (3, 0, 4, 1):  # Out of order: random access.
    frame = tfrecord.decode_frame(reader.read(i))
    assert frame["image/encoded"] == jpegs[i]
    assert (frame["video_id"], frame["frame_index"], frame["image/height"]) == ("v", 3 * i, 24)
    assert frame["timestamp"] == pytest.approx(0.5 * i)
  assert [tfrecord.decode_frame(r)["frame_index"] for r in tfrecord.iter_records(path)] == [
      0, 3, 6, 9, 12]


def test_bad_crc_and_cut_short_shards_are_errors_naming_the_file(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path)
  offsets, sizes = tfrecord.read_index(path)
  original = open(path, "rb").read()
  blob = bytearray(original)
  blob[int(offsets[2]) + 40] ^= 0x01  # One flipped bit inside record 2's data.
  with open(path, "wb") as f:
    f.write(blob)
  reader = tfrecord.ShardReader(path)
  reader.read(1)
  with pytest.raises(tfrecord.CorruptRecordError, match=r"s\.tfrecord.*bad data CRC in record 2"):
    reader.read(2)
  with pytest.raises(tfrecord.CorruptRecordError, match="bad data CRC"):
    list(tfrecord.iter_records(path))

  with open(path, "wb") as f:  # Cut short in the middle of the last record.
    f.write(original[:int(offsets[4]) + 20])
  reader = tfrecord.ShardReader(path)
  with pytest.raises(tfrecord.CorruptRecordError, match=r"s\.tfrecord' is cut short"):
    reader.read(4)
  with pytest.raises(tfrecord.CorruptRecordError, match="cut short"):
    list(tfrecord.iter_records(path))

  os.remove(path + tfrecord.INDEX_SUFFIX)
  with pytest.raises(FileNotFoundError, match=r"s\.tfrecord\.idx.*dora-convert"):
    tfrecord.ShardReader(path)


_TF_SCRIPT = r"""
import io, json, sys
import numpy as np
import tensorflow as tf
ours, theirs = sys.argv[1], sys.argv[2]
features = {"video_id": tf.io.FixedLenFeature([], tf.string),
            "frame_index": tf.io.FixedLenFeature([], tf.int64),
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/height": tf.io.FixedLenFeature([], tf.int64),
            "image/width": tf.io.FixedLenFeature([], tf.int64)}
out = []
for record in tf.data.TFRecordDataset(ours):
  parsed = tf.io.parse_single_example(record, features)
  image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3).numpy()
  out.append({"frame_index": int(parsed["frame_index"]), "video_id": parsed["video_id"].numpy().decode(),
              "shape": list(image.shape), "sum": int(image.astype(np.int64).sum())})
with tf.io.TFRecordWriter(theirs) as writer:
  for i in range(3):
    example = tf.train.Example(features=tf.train.Features(feature={
        "video_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"tf"])),
        "frame_index": tf.train.Feature(int64_list=tf.train.Int64List(value=[10 + i])),
        "timestamp": tf.train.Feature(float_list=tf.train.FloatList(value=[i / 4])),
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[tf.io.encode_jpeg(tf.fill([8, 6, 3], tf.constant(40 * i, tf.uint8))).numpy()])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"jpeg"])),
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[8])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[6])),
    }))
    writer.write(example.SerializeToString())
print(json.dumps(out))
"""


def test_tensorflow_reads_our_shards_and_we_read_tensorflows(tmp_path):
  if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("tensorflow-cpu (the `test` extra) is not installed")
  ours, theirs = str(tmp_path / "ours.tfrecord"), str(tmp_path / "theirs.tfrecord")
  jpegs = _write_shard(ours)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  result = subprocess.run([sys.executable, "-c", _TF_SCRIPT, ours, theirs], capture_output=True,
                          text=True, env=env, timeout=240, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  read_by_tf = json.loads(result.stdout.strip().splitlines()[-1])
  assert [r["frame_index"] for r in read_by_tf] == [0, 3, 6, 9, 12]
  assert all(r["video_id"] == "v" and r["shape"] == [24, 32, 3] for r in read_by_tf)
  for r, jpeg in zip(read_by_tf, jpegs):  # TF decodes our JPEG bytes to what PIL decodes.
    pil_sum = int(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int64).sum())
    assert abs(r["sum"] - pil_sum) <= 2 * 24 * 32 * 3

  # TensorFlow's file: CRCs check out, the index we build reads it, the Examples parse.
  offsets, sizes = tfrecord.build_index(theirs)
  tfrecord.write_index(theirs + tfrecord.INDEX_SUFFIX, offsets, sizes)
  reader = tfrecord.ShardReader(theirs)
  assert len(reader) == 3
  for i in (2, 0, 1):
    frame = tfrecord.decode_frame(reader.read(i))
    assert (frame["video_id"], frame["frame_index"]) == ("tf", 10 + i)
    pixels = np.asarray(Image.open(io.BytesIO(frame["image/encoded"])))
    assert pixels.shape == (8, 6, 3) and abs(float(pixels.mean()) - 40 * i) <= 2
