"""`dora-convert`: videos and images into TFRecord shards of JPEG frames, decoded once, offline.

  dora-convert INPUT [INPUT ...] --out DIR [--every N] [--short-side S] [--quality Q]
               [--frames-per-shard F] [--blank-threshold B] [--verify]

An INPUT is a video file, an image folder or `tfds:NAME:SPLIT`. Every n-th frame of each video
(anything FFmpeg reads, through PyAV) is resized to the given shorter side (frames are never
upscaled), JPEG-encoded and stored as one tf.train.Example per record (see
`tfrecord.FRAME_FEATURES`) in `DIR/{video_id}-{k:05d}.tfrecord`, each shard holding frames of one
video only, with its offset index `*.tfrecord.idx` beside it. Blank or near-constant frames (luma
standard deviation below `--blank-threshold`) are dropped and counted.

An image folder (ROOT/IMAGE or ROOT/CLASS/IMAGE, any depth) or a tfds split (read through
`tfds.data_source`, array_record files, no TensorFlow) is stored the same way as one entry of kind
"images": every image a frame, in sorted path order (the split's order for tfds), each resized
like a video frame and keeping its own size (its record says it). An image that cannot be read is
named and skipped, the others stored; the run then exits 1. Such entries train one frame per clip
(DINO, `config_base.dino_baseline`).

`DIR/manifest.json` lists the options, and per input its source, fps, frame counts and shards. It
is rewritten (atomically) after every shard, so re-running the same command resumes: completed
shards are kept, a shard is written under a temporary name and renamed only when complete, and
completed inputs are skipped. What is already there is checked first (file sizes against the
offset indexes, record counts against the manifest; with --verify every CRC too): an index that is
missing or damaged is rebuilt from its shard, a shard that is missing, cut short or damaged is
written again with those after it, and a video's frame count is corrected to what its shards hold;
each repair is one printed line naming the file and why. Inputs that fail (missing, not a video,
truncated, no decodable frames, a folder without images) are reported one line each, the others
are still converted, and the exit status is 1; an unusable --out folder is one line and exit
status 2.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import sys
import tempfile
from typing import Any, Callable, Sequence

import av
import cv2
import numpy as np
from PIL import Image
import tqdm

from dora_jax.data import images as images_lib
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import tfrecord



class ConversionError(Exception):
  """A video (or the output folder) that cannot be converted; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Options:
  every: int = 1  # Keep every n-th decoded frame.
  short_side: int = 512  # Resize so the shorter side is this (never upscale).
  quality: int = 90  # JPEG quality.
  frames_per_shard: int = 1000  # Stored frames per shard.
  blank_threshold: float = 2.0  # Drop frames whose luma std (0-255) is below this; 0 keeps all.

  def check(self) -> None:
    for name, low, high in (("every", 1, None), ("short_side", 16, None), ("quality", 1, 100),
                            ("frames_per_shard", 1, None)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < low or (high is not None and value > high):
        flag = "--" + name.replace("_", "-")
        limits = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConversionError(f"{flag} must be an integer {limits}, got {value!r}")
    if not self.blank_threshold >= 0:
      raise ConversionError(f"--blank-threshold must be >= 0, got {self.blank_threshold!r}")


def video_id_for(path: str) -> str:
  """The manifest id of a video: its file name without extension, in [A-Za-z0-9_.-]."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "video"


def _read_manifest(out_dir: str) -> dict[str, Any] | None:
  """The manifest in `out_dir`, None when there is none; an error if it is another dataset's."""
  try:
    return manifest_lib.read(out_dir)
  except ValueError as e:
    raise ConversionError(f"{e}; use another --out folder") from None


def _open_video(path: str):
  """(container, stream) of `path`, or a one-line ConversionError naming it."""
  try:
    container = av.open(path)
  except av.FFmpegError as e:
    raise ConversionError(f"'{path}' is not a video FFmpeg can read, or it is truncated "
                          f"({e.strerror or e})") from None
  if not container.streams.video:
    container.close()
    raise ConversionError(f"'{path}' has no video stream")
  stream = container.streams.video[0]
  stream.thread_type = "AUTO"  # Frame-parallel decoding.
  return container, stream


def _output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  scale = min(1.0, short_side / min(width, height))
  return max(1, round(width * scale)), max(1, round(height * scale))


def _is_blank(rgb: np.ndarray, threshold: float) -> bool:
  """Near-constant frame: the luma of a subsampled grid barely varies."""
  if threshold <= 0:
    return False
  grid = rgb[::4, ::4].astype(np.float32)
  luma = grid @ np.array([0.299, 0.587, 0.114], np.float32)
  return float(luma.std()) < threshold


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


_COUNTS = ("frames_decoded", "frames_kept", "frames_dropped_blank", "frames_skipped")


def _resume(entry: dict[str, Any]) -> int:
  """Resets the counters of `entry` to what its complete shards hold; the last frame index they
  hold (-1: none), after which conversion resumes."""
  if entry["shards"]:  # Counters as they were when the last complete shard was written.
    entry.update(entry["shards"][-1]["counts_after"])
    return entry["shards"][-1]["last_frame_index"]
  entry.update({key: 0 for key in _COUNTS})
  if "frames_unreadable" in entry:
    entry["frames_unreadable"] = 0
  return -1


class _EntryShards:
  """Appends the kept frames of one manifest entry to its shards.

  A shard is written under a temporary name and, once it holds `frames_per_shard` frames (or
  at `finish`), renamed, listed in the entry with the counters at that point, and the manifest
  saved: a shard under its final name is always complete and listed.
  """

  def __init__(self, out_dir: str, manifest: dict[str, Any], entry: dict[str, Any],
               frames_per_shard: int):
    self.out_dir, self.manifest, self.entry = out_dir, manifest, entry
    self.frames_per_shard = frames_per_shard
    self.writer: tfrecord.TFRecordWriter | None = None
    self.shard_name = ""
    self.first_index = self.last_index = -1

  def write(self, frame_index: int, timestamp: float, rgb: np.ndarray, quality: int) -> None:
    """Stores one frame (H, W, 3) uint8; the entry's stored size is its smallest frame's."""
    entry = self.entry
    if self.writer is None:
      self.shard_name = f"{entry['id']}-{len(entry['shards']):05d}.tfrecord"
      temp = os.path.join(self.out_dir, self.shard_name + ".tmp")
      self.writer = tfrecord.TFRecordWriter(temp, temp + tfrecord.INDEX_SUFFIX)
      self.first_index = frame_index
    height, width = rgb.shape[:2]
    self.writer.write(tfrecord.encode_frame(
        video_id=entry["id"], frame_index=frame_index, timestamp=timestamp,
        jpeg=_encode_jpeg(rgb, quality), height=height, width=width))
    entry["frames_kept"] += 1
    if entry["height"] is None or min(height, width) < min(entry["height"], entry["width"]):
      entry["height"], entry["width"] = height, width
    self.last_index = frame_index
    if len(self.writer.offsets) == self.frames_per_shard:
      self._close_shard()

  def _close_shard(self) -> None:
    entry = self.entry
    self.writer.close()
    final = os.path.join(self.out_dir, self.shard_name)
    # The index first: a shard file present under its final name always has its index.
    os.replace(final + ".tmp" + tfrecord.INDEX_SUFFIX, final + tfrecord.INDEX_SUFFIX)
    os.replace(final + ".tmp", final)
    counts = _COUNTS + (("frames_unreadable",) if "frames_unreadable" in entry else ())
    entry["shards"].append({
        "file": self.shard_name, "num_records": len(self.writer.offsets),
        "first_frame_index": self.first_index, "last_frame_index": self.last_index,
        "counts_after": {key: entry[key] for key in counts}})
    entry["num_frames"] = entry["frames_kept"]
    manifest_lib.save(self.out_dir, self.manifest)
    self.writer = None

  def finish(self) -> None:
    """Closes and lists the last, partly filled shard."""
    if self.writer is not None:
      self._close_shard()

  def abort(self) -> None:
    """Drops the unfinished shard; the complete ones stay listed."""
    if self.writer is not None:
      self.writer.close()
      for temp in (self.writer.path, self.writer.index_path):
        if os.path.exists(temp):
          os.remove(temp)
      self.writer = None


def _discard_entry(out_dir: str, manifest: dict[str, Any], entry: dict[str, Any]) -> None:
  """Removes an unfinished entry's shards and indexes, and the entry from the manifest."""
  for shard in entry["shards"]:
    for name in (shard["file"], shard["file"] + tfrecord.INDEX_SUFFIX):
      if os.path.exists(os.path.join(out_dir, name)):
        os.remove(os.path.join(out_dir, name))
  manifest["videos"].remove(entry)


def _check_shard(path: str, num_records: int, verify: bool,
                 report: Callable[[str], None]) -> str | None:
  """None when a listed shard is whole, else what is wrong with it.

  Whole: present, with the record count the manifest lists and, with `verify`, every CRC right
  (the framing is walked); otherwise its offset index is checked against the file's size. An
  index that is missing, damaged or (with `verify`) not the shard's is rebuilt from the shard
  when the shard itself is whole, and reported.
  """
  if not os.path.exists(path):
    return "the shard is missing"
  index_path = path + tfrecord.INDEX_SUFFIX
  try:
    listed = tfrecord.read_index(path)
    rebuild = None
  except FileNotFoundError:
    listed, rebuild = None, "it was missing"
  except tfrecord.CorruptRecordError as e:
    listed, rebuild = None, f"it was damaged ({e.problem})"
  if listed is not None and not verify:
    actual = listed  # Consistent with the shard's size; the records are not read.
  else:
    try:
      actual = tfrecord.build_index(path)  # Walks the framing, checking every CRC.
    except tfrecord.CorruptRecordError as e:
      return e.problem
  if len(actual[0]) != num_records:
    return f"the shard holds {len(actual[0])} records, the manifest lists {num_records}"
  if listed is not None and not all(np.array_equal(a, b) for a, b in zip(listed, actual)):
    rebuild = "it did not describe the shard's records"
  if rebuild is not None:
    tfrecord.write_index(index_path, *actual)
    report(f"rebuilt '{index_path}': {rebuild}")
  return None


def _check_shards(out_dir: str, entry: dict[str, Any], verify: bool,
                  report: Callable[[str], None]) -> None:
  """Keeps the listed shards of a video up to the first one that is not whole (reported).

  A video that loses shards is no longer complete: converting it again resumes from there. The
  frame counts of a complete video are corrected to what its shards hold.
  """
  kept = []
  for shard in entry["shards"]:
    path = os.path.join(out_dir, shard["file"])
    problem = _check_shard(path, shard["num_records"], verify, report)
    if problem is not None:
      dropped = len(entry["shards"]) - len(kept)
      report(f"converting video '{entry['id']}' again from '{path}' on ({dropped} shard"
             f"{'s' if dropped > 1 else ''}): {problem}")
      break
    kept.append(shard)
  if len(kept) < len(entry["shards"]):
    for shard in entry["shards"][len(kept):]:
      for name in (shard["file"], shard["file"] + tfrecord.INDEX_SUFFIX):
        if os.path.exists(os.path.join(out_dir, name)):
          os.remove(os.path.join(out_dir, name))
    entry["shards"] = kept
    entry["complete"] = False
  stored = sum(shard["num_records"] for shard in kept)
  if entry["complete"] and (entry["num_frames"], entry["frames_kept"]) != (stored, stored):
    report(f"corrected '{manifest_lib.path_of(out_dir)}': it listed {entry['num_frames']} "
           f"frames for video '{entry['id']}', its shards hold {stored}")
    entry["num_frames"] = entry["frames_kept"] = stored


def convert_video(path: str, out_dir: str, manifest: dict[str, Any], options: Options, *,
                  video_id: str | None = None, verify: bool = False,
                  on_frame: Callable[[int], None] = lambda n: None,
                  set_total: Callable[[int], None] = lambda n: None,
                  report: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
  """Converts one video into `out_dir`, resuming its shards listed in `manifest`.

  Listed shards are checked first (see `_check_shard`; all CRCs with `verify`); from the first
  damaged or missing one on, the video is converted again. Each repair is one `report` line.

  Returns its manifest entry (also updated in `manifest` and saved after every shard).
  """
  video_id = video_id or video_id_for(path)
  if not os.path.exists(path):
    raise ConversionError(f"video '{path}' does not exist")
  if not os.path.isfile(path):
    raise ConversionError(f"video '{path}' is not a file")
  source_bytes = os.path.getsize(path)
  entry = next((v for v in manifest["videos"] if v["id"] == video_id), None)
  if entry is not None and (entry["source_bytes"] != source_bytes or
                            os.path.basename(entry["source"]) != os.path.basename(path)):
    if not entry["complete"]:  # An unfinished conversion of an older file: start over.
      _discard_entry(out_dir, manifest, entry)
      entry = None
    else:
      raise ConversionError(
          f"video id '{video_id}' of '{path}' is already in '{manifest_lib.path_of(out_dir)}' "
          f"from '{entry['source']}' ({entry['source_bytes']} bytes); rename the file or use "
          "another --out folder")
  if entry is not None:
    _check_shards(out_dir, entry, verify, report)
    manifest_lib.save(out_dir, manifest)  # The repairs, before anything else can fail.
  if entry is not None and entry["complete"]:
    set_total(entry["frames_decoded"])
    on_frame(entry["frames_decoded"])
    return entry
  container, stream = _open_video(path)
  try:
    fps = float(stream.average_rate or stream.guessed_rate or 0) or None
    if entry is None:
      entry = {"id": video_id, "kind": manifest_lib.VIDEO, "source": os.path.abspath(path),
               "source_bytes": source_bytes,
               "fps": fps, "complete": False, "frames_decoded": 0, "frames_kept": 0,
               "frames_dropped_blank": 0, "frames_skipped": 0, "num_frames": 0,
               "height": None, "width": None, "source_height": stream.height,
               "source_width": stream.width, "shards": []}
      manifest["videos"].append(entry)
    resume_after = _resume(entry)
    total = stream.frames
    if not total and stream.duration and fps:
      total = int(round(float(stream.duration * stream.time_base) * fps))
    set_total(total or None)
    shards = _EntryShards(out_dir, manifest, entry, options.frames_per_shard)
    frame_index = -1
    try:
      for frame_index, frame in enumerate(container.decode(stream)):
        on_frame(1)
        if frame_index <= resume_after:  # In a completed shard: decoded, not re-encoded.
          continue
        entry["frames_decoded"] += 1
        if frame_index % options.every:
          entry["frames_skipped"] += 1
          continue
        width, height = _output_size(frame.width, frame.height, options.short_side)
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height,
                               interpolation="AREA")
        if _is_blank(rgb, options.blank_threshold):
          entry["frames_dropped_blank"] += 1
          continue
        timestamp = frame.time if frame.time is not None else frame_index / (fps or 1.0)
        shards.write(frame_index, timestamp, rgb, options.quality)
    except BaseException as e:
      shards.abort()
      if isinstance(e, av.FFmpegError):
        if frame_index < 0:
          raise ConversionError(f"video '{path}' has 0 decodable frames ({e.strerror or e})"
                                ) from None
        raise ConversionError(
            f"video '{path}' is truncated or corrupt: decoding failed after frame {frame_index} "
            f"({e.strerror or e}); its complete shards are kept") from None
      raise
    shards.finish()
    if frame_index < 0:
      raise ConversionError(f"video '{path}' has 0 decodable frames")
    decoded = frame_index + 1
    if total and stream.frames and decoded < total - max(2, total // 100):
      # The container's frame table lists more: the file was cut short (e.g. a faststart mp4).
      raise ConversionError(
          f"video '{path}' is truncated: {decoded} of the {total} frames its header lists "
          "decode; its complete shards are kept")
    if entry["frames_kept"] == 0:
      raise ConversionError(
          f"video '{path}': all {entry['frames_decoded']} decoded frames were dropped as blank "
          f"(--blank-threshold {options.blank_threshold}); nothing to store")
    entry["num_frames"] = entry["frames_kept"]
    entry["complete"] = True
    manifest_lib.save(out_dir, manifest)
    return entry
  finally:
    container.close()


# ---- Images: an image folder or a tfds split, every image a frame, the source a "video". ----


class _ImageFolderFrames:
  """The images under `root` (any depth: ROOT/IMAGE or ROOT/CLASS/IMAGE), in sorted path order."""

  def __init__(self, root: str):
    self.name = root
    self.source = os.path.abspath(root)
    self.paths = sorted(
        (os.path.relpath(os.path.join(folder, name), root)
         for folder, _, names in os.walk(root, followlinks=True) for name in names
         if name.lower().endswith(images_lib.IMAGE_EXTENSIONS)),
        key=lambda relative: relative.split(os.sep))
    if not self.paths:
      raise ConversionError(
          f"image folder '{root}' has no images (extensions "
          f"{' '.join(images_lib.IMAGE_EXTENSIONS)} under ROOT/ or ROOT/CLASS/); give a folder "
          "of images")

  def __len__(self) -> int:
    return len(self.paths)

  def name_of(self, index: int) -> str:
    return os.path.join(self.name, self.paths[index])

  def read(self, index: int) -> np.ndarray:
    with Image.open(os.path.join(self.name, self.paths[index])) as image:
      return np.asarray(image.convert("RGB"))


class _TfdsFrames:
  """The images of a tfds split (`tfds:NAME:SPLIT`), through `tfds.data_source` (array_record)."""

  def __init__(self, spec: str):
    try:
      self.images = images_lib.open_source(spec, label_key=None)
    except images_lib.SourceError as e:
      raise ConversionError(str(e)) from None
    self.name = self.source = spec

  def __len__(self) -> int:
    return len(self.images)

  def name_of(self, index: int) -> str:
    return f"{self.name}[{index}]"

  def read(self, index: int) -> np.ndarray:
    return self.images[index]["image"]


def is_tfds(spec: str) -> bool:
  return spec.startswith(images_lib.TFDS_PREFIX)


def input_id_for(spec: str) -> str:
  """The manifest id of an input: a video's file name without extension, an image folder's name,
  `NAME_SPLIT` of a tfds split; in [A-Za-z0-9_.-]."""
  if is_tfds(spec):
    name = spec[len(images_lib.TFDS_PREFIX):].replace(":", "_").replace("/", "_")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "images"
  if os.path.isdir(spec):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.abspath(spec))) or "images"
  return video_id_for(spec)


def _resized(rgb: np.ndarray, short_side: int) -> np.ndarray:
  """`rgb` with its shorter side `short_side` (never upscaled), area-averaged as video frames."""
  height, width = rgb.shape[:2]
  new_width, new_height = _output_size(width, height, short_side)
  if (new_width, new_height) == (width, height):
    return np.ascontiguousarray(rgb)
  return cv2.resize(rgb, (new_width, new_height), interpolation=cv2.INTER_AREA)


def convert_images(spec: str, out_dir: str, manifest: dict[str, Any], options: Options, *,
                   image_id: str | None = None, verify: bool = False,
                   on_frame: Callable[[int], None] = lambda n: None,
                   set_total: Callable[[int], None] = lambda n: None,
                   report: Callable[[str], None] = lambda line: None,
                   on_unreadable: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
  """Converts an image folder or `tfds:NAME:SPLIT` into `out_dir`: every image a frame (in sorted
  path order for a folder, the split's order for tfds), the source one manifest entry of kind
  `manifest.IMAGES`, resumed like a video's (see `convert_video`).

  An image that cannot be read is skipped, one line to `on_unreadable` naming it, and listed in the
  entry's `unreadable` ([index, name] pairs); the others are stored.

  Returns its manifest entry (also updated in `manifest` and saved after every shard).
  """
  frames = _TfdsFrames(spec) if is_tfds(spec) else _ImageFolderFrames(spec)
  image_id = image_id or input_id_for(spec)
  entry = next((v for v in manifest["videos"] if v["id"] == image_id), None)
  if entry is not None and (entry.get("source") != frames.source or
                            entry.get("source_images") != len(frames)):
    if not entry["complete"]:  # An unfinished conversion of other images: start over.
      _discard_entry(out_dir, manifest, entry)
      entry = None
    else:
      raise ConversionError(
          f"id '{image_id}' of '{spec}' ({len(frames)} images) is already in "
          f"'{manifest_lib.path_of(out_dir)}' from '{entry['source']}'; rename the folder or use "
          "another --out folder")
  set_total(len(frames))
  if entry is not None:
    _check_shards(out_dir, entry, verify, report)
    manifest_lib.save(out_dir, manifest)
    if entry["complete"]:
      on_frame(len(frames))
      return entry
  else:
    entry = {"id": image_id, "kind": manifest_lib.IMAGES, "source": frames.source,
             "source_bytes": None, "source_images": len(frames), "fps": None, "complete": False,
             "frames_decoded": 0, "frames_kept": 0, "frames_dropped_blank": 0,
             "frames_skipped": 0, "frames_unreadable": 0, "unreadable": [], "num_frames": 0,
             "height": None, "width": None, "shards": []}
    manifest["videos"].append(entry)
  resume_after = _resume(entry)
  entry["unreadable"] = [item for item in entry["unreadable"] if item[0] <= resume_after]
  on_frame(resume_after + 1)
  shards = _EntryShards(out_dir, manifest, entry, options.frames_per_shard)
  try:
    for index in range(resume_after + 1, len(frames)):
      on_frame(1)
      entry["frames_decoded"] += 1
      if index % options.every:
        entry["frames_skipped"] += 1
        continue
      try:
        rgb = images_lib.to_rgb(frames.read(index))
      except Exception as e:  # pylint: disable=broad-except  # PIL and tfds raise many kinds.
        entry["frames_unreadable"] += 1
        entry["unreadable"].append([index, frames.name_of(index)])
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        on_unreadable(f"image '{frames.name_of(index)}' cannot be read ({why}); skipped, the "
                      f"other images of '{spec}' are stored")
        continue
      rgb = _resized(rgb, options.short_side)
      if _is_blank(rgb, options.blank_threshold):
        entry["frames_dropped_blank"] += 1
        continue
      shards.write(index, 0.0, rgb, options.quality)
  except BaseException:
    shards.abort()
    raise
  shards.finish()
  if entry["frames_kept"] == 0:
    raise ConversionError(
        f"'{spec}': none of its {len(frames)} images was stored ({entry['frames_unreadable']} "
        f"unreadable, {entry['frames_dropped_blank']} blank at --blank-threshold "
        f"{options.blank_threshold}, {entry['frames_skipped']} skipped by --every)")
  entry["num_frames"] = entry["frames_kept"]
  entry["complete"] = True
  manifest_lib.save(out_dir, manifest)
  return entry


def _make_output_folder(out_dir: str) -> None:
  """Creates `out_dir` if needed; a one-line ConversionError when it cannot hold the shards."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConversionError(f"--out '{out_dir}' is a file, not a folder; give a folder")
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):  # Writable? Asked by writing, as root too.
      pass
  except OSError as e:
    raise ConversionError(f"--out '{out_dir}' cannot hold the shards ({e.strerror or e}); "
                          "give a writable folder") from None


def convert(inputs: Sequence[str], out_dir: str, *, every: int = 1, short_side: int = 512,
            quality: int = 90, frames_per_shard: int = 1000, blank_threshold: float = 2.0,
            progress: bool = True, verify: bool = False,
            errors: list[str] | None = None,
            report: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Converts `inputs` into shards in `out_dir` and returns the manifest.

  An input is a video file, an image folder or `tfds:NAME:SPLIT` (see `convert_images`). Each
  failing input, and each unreadable image, gives a one-line message; the others are still
  converted. The messages
  are appended to `errors` when it is given, otherwise the first raises ConversionError at the end.
  Errors about the output folder (not a writable folder, another dataset's manifest, other
  options) raise at once. Each file rewritten to repair the data already there (an index rebuilt,
  a damaged shard converted again, a frame count corrected) is one line to `report` (default:
  printed).
  """
  options = Options(every=every, short_side=short_side, quality=quality,
                    frames_per_shard=frames_per_shard, blank_threshold=float(blank_threshold))
  options.check()
  if not inputs:
    raise ConversionError("no videos, image folders or tfds:NAME:SPLIT given")
  _make_output_folder(out_dir)
  manifest = _read_manifest(out_dir)
  wanted = dataclasses.asdict(options)
  if manifest is None:
    manifest = {"format": manifest_lib.FORMAT, "options": wanted, "videos": []}
  elif manifest.get("options") != wanted:
    raise ConversionError(
        f"'{manifest_lib.path_of(out_dir)}' was written with options {manifest.get('options')}, "
        f"not {wanted}; use the same options or another --out folder")
  for name in os.listdir(out_dir):  # Leftovers of an interrupted run.
    if name.endswith(".tmp") or name.endswith(".tmp" + tfrecord.INDEX_SUFFIX):
      os.remove(os.path.join(out_dir, name))

  ids: dict[str, str] = {}
  failures: list[str] = []
  bar = tqdm.tqdm(total=0, unit="frame", dynamic_ncols=True, disable=not progress,
                  file=sys.stderr)
  if report is None:
    report = lambda line: bar.write(line, file=sys.stdout)  # Above the progress bar.
  try:
    for path in inputs:
      video_id = input_id_for(path)
      if video_id in ids:
        failures.append(f"inputs '{ids[video_id]}' and '{path}' would share the id '{video_id}'; "
                        "rename one")
        continue
      ids[video_id] = path
      bar.set_description(video_id)
      common = dict(verify=verify, on_frame=bar.update, set_total=lambda n: bar.reset(total=n),
                    report=report)
      try:
        if is_tfds(path) or os.path.isdir(path):
          convert_images(path, out_dir, manifest, options, image_id=video_id,
                         on_unreadable=failures.append, **common)
        else:
          convert_video(path, out_dir, manifest, options, video_id=video_id, **common)
      except ConversionError as e:
        failures.append(str(e))
  finally:
    bar.close()
  manifest_lib.save(out_dir, manifest)
  if failures:
    if errors is None:
      raise ConversionError(failures[0] + (f" (and {len(failures) - 1} more)"
                                           if len(failures) > 1 else ""))
    errors.extend(failures)
  return manifest
