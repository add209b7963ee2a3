"""TFRecord framing, CRC checks, offset indexes, and interop with TensorFlow both ways."""
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys

import crc32c
import hypothesis
from hypothesis import strategies as st
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
  with pytest.raises(tfrecord.CorruptRecordError, match=r"s\.tfrecord' has \d+ bytes.*cut short"):
    tfrecord.ShardReader(path)  # The index no longer ends where the file does.
  with pytest.raises(tfrecord.CorruptRecordError, match=r"s\.tfrecord' is cut short: record 4"):
    list(tfrecord.iter_records(path))

  with open(path, "wb") as f:  # Cut short after the reader checked the index.
    f.write(original)
  reader = tfrecord.ShardReader(path)
  os.truncate(path, int(offsets[4]) + 20)
  reader.read(3)
  with pytest.raises(tfrecord.CorruptRecordError, match=r"s\.tfrecord' is cut short: record 4"):
    reader.read(4)

  os.remove(path + tfrecord.INDEX_SUFFIX)
  with pytest.raises(FileNotFoundError, match=r"s\.tfrecord\.idx.*dora-convert"):
    tfrecord.ShardReader(path)


def _set_length(blob: bytearray, offset: int, length: int) -> None:
  """Writes `length` into the record at `offset` with a matching length CRC."""
  field = struct.pack("<Q", length)
  blob[offset:offset + 12] = field + struct.pack("<I", tfrecord.masked_crc(field))


def test_a_damaged_length_is_an_error_before_anything_is_allocated(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path)
  offsets, _ = tfrecord.read_index(path)
  original = open(path, "rb").read()
  blob = bytearray(original)
  blob[int(offsets[1]) + 6] ^= 0x80  # The length's high bits: 2**55 more bytes, CRC now wrong.
  open(path, "wb").write(blob)
  with pytest.raises(tfrecord.CorruptRecordError, match="bad length CRC in record 1 at byte"):
    list(tfrecord.iter_records(path))
  with pytest.raises(tfrecord.CorruptRecordError, match="bad length CRC in record 1"):
    tfrecord.ShardReader(path).read(1)
  # A length whose CRC matches (as if written so): larger than the file, refused unread.
  for length in (2**64 - 1, 2**63, len(original)):
    blob = bytearray(original)
    _set_length(blob, int(offsets[1]), length)
    open(path, "wb").write(blob)
    with pytest.raises(tfrecord.CorruptRecordError,
                       match=rf"record 1 at byte {offsets[1]} needs {length + 16} bytes"):
      list(tfrecord.iter_records(path))
    with pytest.raises(tfrecord.CorruptRecordError, match="record 1 .* holds .* its index"):
      tfrecord.ShardReader(path).read(1)


def test_every_kind_of_index_damage_is_a_corrupt_record_error(tmp_path):
  path = str(tmp_path / "s.tfrecord")
  _write_shard(path)
  offsets, sizes = tfrecord.read_index(path)
  lines = [f"{o} {s}" for o, s in zip(offsets, sizes)]
  file_size = os.path.getsize(path)
  damaged = {
      "binary": b"\x89\xff\x00\xfe" * 8,
      "not numbers": b"offset size\n",
      "odd count": " ".join(lines + ["17"]).encode(),
      "negative offset": "\n".join(["-10 10"] + lines[1:]).encode(),
      "negative size": "\n".join(lines[:4] + [f"{offsets[4]} -5"]).encode(),
      "huge value": "\n".join(lines[:4] + [f"{offsets[4]} {10**30}"]).encode(),
      "not increasing": "\n".join([lines[0], lines[2], lines[1], *lines[3:]]).encode(),
      "overlapping": "\n".join(lines[:2] + [f"{offsets[2] - 8} {sizes[2] + 8}", *lines[3:]]
                                ).encode(),
      "duplicated": "\n".join(lines[:3] + lines[2:]).encode(),
      "size past the end": "\n".join(lines[:4] + [f"{offsets[4]} {sizes[4] + 1}"]).encode(),
      "a record lost": "\n".join(lines[:4]).encode(),
      "empty": b"",
      "too large for the shard": b"0 16\n" * file_size,
  }
  for kind, text in damaged.items():
    open(path + tfrecord.INDEX_SUFFIX, "wb").write(text)
    with pytest.raises(tfrecord.CorruptRecordError, match=r"s\.tfrecord.*--verify") as error:
      tfrecord.ShardReader(path)
    assert "\n" not in str(error.value), kind
  # Right framing, wrong count: only the count the manifest lists tells.
  merged = f"0 {sizes[0] + sizes[1]}"
  open(path + tfrecord.INDEX_SUFFIX, "w").write("\n".join([merged, *lines[2:]]))
  with pytest.raises(tfrecord.CorruptRecordError, match=r"lists 4 records, the manifest 5"):
    tfrecord.ShardReader(path, num_records=5)
  with pytest.raises(tfrecord.CorruptRecordError, match="record 0 .* holds"):
    tfrecord.ShardReader(path).read(0)


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


# The fuzz test: random records, damaged at random; every read returns what was written or raises
# CorruptRecordError, never anything else (MemoryError, UnicodeDecodeError, OverflowError, ...).
_SHARD_DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(0, 7)),  # byte (mod size), bit
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),  # new size (mod size)
    st.tuples(st.just("length"), st.integers(0, 3), st.integers(0, 2**64 - 1), st.booleans()),
    st.tuples(st.just("overwrite"), st.integers(0, 2**16), st.binary(min_size=1, max_size=16)),
)
_INDEX_DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(0, 7)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),  # Replaced by garbage (often binary).
    st.tuples(st.just("value"), st.integers(0, 7), st.integers(-2**70, 2**70)),
    st.tuples(st.just("line"), st.sampled_from(["drop", "duplicate", "swap"]), st.integers(0, 3)),
    st.tuples(st.just("truncate"), st.integers(0, 2**10)),
)


def _damage_shard(blob: bytearray, offsets, damage) -> bytearray:
  kind, *args = damage
  if not blob:
    return blob
  if kind == "flip":
    blob[args[0] % len(blob)] ^= 1 << args[1]
  elif kind == "truncate":
    del blob[args[0] % len(blob):]
  elif kind == "length":  # A random length field, with its CRC made to match or not.
    record, length, matching_crc = args
    offset = int(offsets[record % len(offsets)])
    if offset + 12 <= len(blob):
      if matching_crc:
        _set_length(blob, offset, length)
      else:
        blob[offset:offset + 8] = struct.pack("<Q", length)
  else:
    position = args[0] % len(blob)
    blob[position:position + len(args[1])] = args[1]
  return blob


def _damage_index(text: bytes, damage) -> bytes:
  kind, *args = damage
  if kind == "flip" and text:
    text = bytearray(text)
    text[args[0] % len(text)] ^= 1 << args[1]
    return bytes(text)
  if kind == "bytes":
    return args[0]
  if kind == "truncate":
    return text[:args[0] % (len(text) + 1)]
  words = text.split()
  if kind == "value":
    words[args[0] % len(words)] = str(args[1]).encode()
    return b" ".join(words)
  lines = text.splitlines()
  i = args[1] % len(lines)
  if args[0] == "drop":
    del lines[i]
  elif args[0] == "duplicate":
    lines.insert(i, lines[i])
  elif i + 1 < len(lines):
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
  return b"\n".join(lines)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("fuzz")


def _walk(path) -> tuple[list[bytes], bool]:
  """The records `iter_records` yields before it ends or raises, and whether it raised."""
  walked = []
  try:
    for record in tfrecord.iter_records(path):
      walked.append(record)
  except tfrecord.CorruptRecordError:
    return walked, True
  return walked, False


# Records of length 0 included: a frame is never empty, but the framing allows it.
_RECORDS = st.lists(st.one_of(st.just(b""), st.binary(max_size=48)), min_size=1, max_size=4)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
@hypothesis.given(records=_RECORDS, shard_damage=st.lists(_SHARD_DAMAGE, max_size=3),
                  index_damage=st.one_of(st.none(), _INDEX_DAMAGE))
@hypothesis.example(records=[b"", b"abc", b""], shard_damage=[], index_damage=None)
def test_fuzz_every_read_returns_the_data_or_raises_corrupt_record_error(
    fuzz_dir, records, shard_damage, index_damage):
  # What was not damaged must read: a reader that refuses good data fails here, not only one
  # that returns bad data. Damage is judged by the bytes (a damage can leave them unchanged).
  path = str(fuzz_dir / "s.tfrecord")
  index_path = path + tfrecord.INDEX_SUFFIX
  with tfrecord.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  offsets, sizes = writer.offsets, writer.sizes
  written = open(path, "rb").read()
  written_index = open(index_path, "rb").read()
  blob = bytearray(written)
  for damage in shard_damage:
    blob = _damage_shard(blob, offsets, damage)
  open(path, "wb").write(blob)
  if index_damage is not None:
    open(index_path, "wb").write(_damage_index(written_index, index_damage))
  index_intact = open(index_path, "rb").read() == written_index
  intact = [bytes(blob[o:o + s]) == written[o:o + s] for o, s in zip(offsets, sizes)]

  # Walking the framing (what --verify does): the records, or the records before a cut; every
  # record before the first damaged one is read.
  walked, raised = _walk(path)
  assert walked == records[:len(walked)]
  leading_intact = next((i for i, ok in enumerate(intact) if not ok), len(records))
  assert len(walked) >= leading_intact
  if bytes(blob) == written:
    assert len(walked) == len(records) and not raised
  if not raised:
    assert len(walked) == len(records) or len(blob) < len(written)
    offsets_walked, _ = tfrecord.build_index(path)
    assert len(offsets_walked) == len(walked)

  # Random access through the index (what training does): with the index and the shard's size
  # as written it opens, and every record whose bytes are as written reads back.
  try:
    reader = tfrecord.ShardReader(path, num_records=len(records))
  except tfrecord.CorruptRecordError:
    assert not (index_intact and len(blob) == len(written))
    return
  for i, record in enumerate(records):
    try:
      assert reader.read(i) == record
    except tfrecord.CorruptRecordError:
      assert not (index_intact and intact[i])
  reader.close()
