"""The start-up check of converted data: every shard and index present, sizes and counts agree."""
import copy
import json
import os

import numpy as np
import pytest

from dora_jax import config_base
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import pipeline
from dora_jax.data import source
from dora_jax.data import tfrecord

NUM_VIDEOS, SHARDS_PER_VIDEO, RECORDS_PER_SHARD = 10, 100, 3  # A thousand tiny shards.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A manifest and shards of tiny records, written directly (no video: the check reads none)."""
  folder = tmp_path_factory.mktemp("data")
  videos = []
  for v in range(NUM_VIDEOS):
    shards = []
    for k in range(SHARDS_PER_VIDEO):
      name = f"v{v}-{k:05d}.tfrecord"
      framed = [tfrecord.frame_record(f"{v}/{k}/{r}".encode()) for r in range(RECORDS_PER_SHARD)]
      (folder / name).write_bytes(b"".join(framed))
      sizes = [len(f) for f in framed]
      tfrecord.write_index(str(folder / name) + tfrecord.INDEX_SUFFIX,
                           np.cumsum([0] + sizes[:-1]), sizes)
      shards.append({"file": name, "num_records": RECORDS_PER_SHARD})
    videos.append({"id": f"v{v}", "complete": True, "height": 48, "width": 64,
                   "num_frames": SHARDS_PER_VIDEO * RECORDS_PER_SHARD, "shards": shards})
  manifest = {"format": "dora_jax.frames/1", "videos": videos}
  (folder / "manifest.json").write_text(json.dumps(manifest))
  return str(folder)


def _config(data_dir):
  config = config_base.get_base_config().data
  config.dir = data_dir
  config.frames_per_clip, config.frame_stride = 2, 1
  config.global_pre_size, config.global_size, config.local_size = 40, 32, 16
  return config


def _cut(path, nbytes):
  os.truncate(path, os.path.getsize(path) - nbytes)


def _rewrite_index(path, edit):
  text = open(path + ".idx").read()
  open(path + ".idx", "w").write(edit(text))


# name -> (damage(shard path, video entry), what the one-line error says).
_DAMAGE = {
    "shard missing": (lambda path, video: os.remove(path), r"shard '.*v7-00077\.tfrecord' is missing"),
    "index missing": (lambda path, video: os.remove(path + ".idx"),
                      r"index '.*v7-00077\.tfrecord\.idx' .* is missing"),
    "shard cut short": (lambda path, video: _cut(path, 1),
                        r"shard '.*v7-00077\.tfrecord' has \d+ bytes, but its index .* cut short"),
    "shard grown": (lambda path, video: open(path, "ab").write(b"\0" * 20),
                    r"shard '.*v7-00077\.tfrecord' has \d+ bytes, but its index"),
    "index cut short": (lambda path, video: _cut(path + ".idx", 4),
                        r"index '.*v7-00077\.tfrecord\.idx' is not lines of 'offset size'"),
    "index binary": (lambda path, video: open(path + ".idx", "wb").write(bytes(range(128, 192))),
                     r"index '.*v7-00077\.tfrecord\.idx' is not lines of 'offset size'"),
    "index overlapping": (  # Record 0 listed 10 bytes longer, into record 1.
        lambda path, video: _rewrite_index(path, lambda t: t.replace(" 22\n", " 32\n", 1)),
        r"index '.*v7-00077\.tfrecord\.idx' is damaged at record 1 \(listed at byte 22"),
    "records in the manifest": (
        lambda path, video: video["shards"][77].update(num_records=RECORDS_PER_SHARD + 1),
        r"v7-00077\.tfrecord.* lists 3 records, the manifest 4"),
    "frames in the manifest": (lambda path, video: video.update(num_frames=400),
                               r"manifest\.json' lists 400 frames for video 'v7', its shards hold "
                               r"300"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_each_damage_is_one_line_naming_the_file(data_dir, damage):
  damage_fn, message = _DAMAGE[damage]
  manifest = manifest_lib.load(data_dir)
  source.check_data(data_dir, manifest["videos"])  # Whole.
  path = os.path.join(data_dir, "v7-00077.tfrecord")
  saved = {p: open(p, "rb").read() for p in (path, path + ".idx")}
  videos = copy.deepcopy(manifest["videos"])
  try:
    damage_fn(path, videos[7])
    with pytest.raises(ValueError, match=message) as error:
      source.check_data(data_dir, videos)
    assert "\n" not in str(error.value)
    assert str(error.value).endswith("re-run dora-convert with --verify")
    source.check_data(data_dir, videos[:7] + videos[8:])  # The other videos are whole.
  finally:
    for p, blob in saved.items():
      open(p, "wb").write(blob)


def test_the_check_reads_sizes_and_indexes_not_records(data_dir):
  path = os.path.join(data_dir, "v3-00010.tfrecord")
  blob = open(path, "rb").read()
  damaged = bytearray(blob)
  damaged[20] ^= 0x01  # Same size, a record's data flipped: found when read, or by --verify.
  try:
    open(path, "wb").write(damaged)
    videos = manifest_lib.load(data_dir)["videos"]
    source.check_data(data_dir, videos)
    with pytest.raises(tfrecord.CorruptRecordError, match="bad data CRC in record 0"):
      source.FrameStore(data_dir, videos[3:4]).read_frame(0, 10 * RECORDS_PER_SHARD)
  finally:
    open(path, "wb").write(blob)


def test_the_clip_plan_runs_the_check_before_trusting_the_manifest(data_dir):
  assert pipeline.plan_clips(_config(data_dir)).videos
  path = os.path.join(data_dir, "v0-00042.tfrecord.idx")
  os.rename(path, path + ".away")
  try:
    with pytest.raises(ValueError, match=r"v0-00042\.tfrecord\.idx' .* is missing; re-run "
                       "dora-convert with --verify"):
      pipeline.plan_clips(_config(data_dir))
  finally:
    os.rename(path + ".away", path)
