"""Random access to stored frames and clips: the grain data source.

`FrameStore` reads frame `i` of a video through the shards' offset indexes (one `pread`, CRCs
checked). `ClipIndex` enumerates the clips of T frames at a stride that fit inside one video:
clip j is (video, start) and holds stored frames start, start + stride, ..., of that video only.
`ClipSource` is the grain `RandomAccessDataSource` that returns a clip's JPEG bytes.

Nothing here imports jax: these objects are pickled into grain's worker processes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from dora_jax.data import manifest as manifest_lib
from dora_jax.data import tfrecord
from dora_jax import paths

def _open_shards(data_dir: str, video: dict[str, Any]) -> list[tfrecord.ShardReader]:
  """Readers of the shards of a manifest entry, checked from file sizes and indexes only.

  Every shard and index present, each index ending where its shard does and listing the records
  the manifest lists for the shard, and those summing to the video's frames.

  Raises:
    ValueError (tfrecord.CorruptRecordError for a damaged index): one line naming the file.
  """
  readers = []
  for shard in video["shards"]:
    try:
      readers.append(tfrecord.ShardReader(paths.join(data_dir, shard["file"]),
                                          num_records=int(shard["num_records"])))
    except FileNotFoundError as e:  # A missing file is a damaged data set, like a damaged one.
      raise ValueError(str(e)) from None
  stored = sum(len(r) for r in readers)
  if stored != video["num_frames"]:
    raise ValueError(
        f"'{manifest_lib.path_of(data_dir)}' lists {video['num_frames']} frames for video "
        f"'{video['id']}', its shards hold {stored}; {tfrecord.REPAIR}")
  return readers


def check_data(data_dir: str, videos: Sequence[dict[str, Any]]) -> None:
  """Checks the shards of `videos` (manifest entries) against the manifest, reading no record.

  Fast (file sizes and index files only: 0.3-0.5 s for a thousand shards of a thousand frames on
  a busy 2-core VM, benchmarks/data_check.py), so it runs before anything is written or compiled;
  the records' CRCs are checked as they are read, and all of them by `dora-convert --verify`.

  Raises:
    ValueError: one line naming the file that is missing or inconsistent and what to do.
  """
  for video in videos:
    _open_shards(data_dir, video)


class FrameStore:
  """Stored frames of some videos, by (video number, frame number), through the offset indexes."""

  def __init__(self, data_dir: str, videos: Sequence[dict[str, Any]]):
    self.data_dir = data_dir
    self.video_ids = [v["id"] for v in videos]
    self._shards: list[list[tfrecord.ShardReader]] = []
    self._starts: list[np.ndarray] = []  # First frame number of each shard, per video.
    self.num_frames: list[int] = []
    for video in videos:
      readers = _open_shards(data_dir, video)
      counts = np.array([len(r) for r in readers], np.int64)
      self._shards.append(readers)
      self._starts.append(np.concatenate([[0], np.cumsum(counts)]))
      self.num_frames.append(int(counts.sum()))

  def _locate(self, video: int, frame: int) -> tuple[tfrecord.ShardReader, int]:
    starts = self._starts[video]
    if not 0 <= frame < starts[-1]:
      raise IndexError(f"frame {frame} of video '{self.video_ids[video]}' out of range "
                       f"({starts[-1]} frames)")
    shard = int(np.searchsorted(starts, frame, side="right")) - 1
    return self._shards[video][shard], frame - int(starts[shard])

  def read_frame(self, video: int, frame: int) -> dict[str, Any]:
    """The decoded features of the frame record (see `tfrecord.FRAME_FEATURES`)."""
    reader, record = self._locate(video, frame)
    return tfrecord.decode_frame(reader.read(record), path=reader.path)

  def read_jpeg(self, video: int, frame: int) -> bytes:
    return self.read_frame(video, frame)["image/encoded"]


@dataclasses.dataclass(frozen=True)
class ClipIndex:
  """All clips of `frames_per_clip` frames `frame_stride` apart inside one video each.

  Clip j -> (video number, first stored frame); the starts of video v are 0 ...
  num_frames[v] - span, span = (frames_per_clip - 1) * frame_stride + 1.
  """
  num_frames: tuple[int, ...]
  frames_per_clip: int
  frame_stride: int

  @property
  def span(self) -> int:
    return (self.frames_per_clip - 1) * self.frame_stride + 1

  @functools.cached_property
  def clips_per_video(self) -> np.ndarray:
    return np.maximum(np.asarray(self.num_frames, np.int64) - self.span + 1, 0)

  @functools.cached_property
  def _ends(self) -> np.ndarray:
    return np.cumsum(self.clips_per_video)

  def __len__(self) -> int:
    return int(self.clips_per_video.sum())

  def locate(self, index: int) -> tuple[int, int]:
    """(video number, start frame) of clip `index`."""
    ends = self._ends
    if not 0 <= index < ends[-1]:
      raise IndexError(f"clip {index} out of range ({int(ends[-1])} clips)")
    video = int(np.searchsorted(ends, index, side="right"))
    start = index - (int(ends[video - 1]) if video else 0)
    return video, start

  def frames(self, index: int) -> tuple[int, np.ndarray]:
    """(video number, the T stored frame numbers) of clip `index`."""
    video, start = self.locate(index)
    return video, start + self.frame_stride * np.arange(self.frames_per_clip)


class ClipSource:
  """grain RandomAccessDataSource: clip j -> {'jpegs': T JPEG bytes, 'video', 'frames', 'size'}.

  'video' is the video number, 'frames' the T stored frame numbers, 'size' the stored (H, W) of
  the clip's first frame (as its record says).
  """

  def __init__(self, data_dir: str, videos: Sequence[dict[str, Any]], frames_per_clip: int,
               frame_stride: int):
    self.store = FrameStore(data_dir, videos)
    self.index = ClipIndex(tuple(self.store.num_frames), frames_per_clip, frame_stride)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    video, frames = self.index.frames(int(index))
    records = [self.store.read_frame(video, int(f)) for f in frames]
    # The size each record stores: a video's frames share one, an image folder's each have theirs
    # (and its clips hold one frame, see `pipeline.plan_clips`).
    size = (int(records[0]["image/height"]), int(records[0]["image/width"]))
    return {"jpegs": [record["image/encoded"] for record in records], "video": video,
            "frames": frames, "size": size}

  def __repr__(self) -> str:
    return (f"ClipSource(dir={self.store.data_dir!r}, videos={self.store.video_ids}, "
            f"T={self.index.frames_per_clip}, stride={self.index.frame_stride}, clips={len(self)})")
