"""`dora-convert`: videos into TFRecord shards of JPEG frames, decoded once, offline.

  dora-convert VIDEO [VIDEO ...] --out DIR [--every N] [--short-side S] [--quality Q]
               [--frames-per-shard F] [--blank-threshold B] [--verify]

Every n-th frame of each video (anything FFmpeg reads, through PyAV) is resized to the given
shorter side (frames are never upscaled), JPEG-encoded and stored as one tf.train.Example per
record (see `tfrecord.FRAME_FEATURES`) in `DIR/{video_id}-{k:05d}.tfrecord`, each shard holding
frames of one video only, with its offset index `*.tfrecord.idx` beside it. Blank or near-constant
frames (luma standard deviation below `--blank-threshold`) are dropped and counted.

`DIR/manifest.json` lists the options, and per video its source, fps, frame counts and shards. It
is rewritten (atomically) after every shard, so re-running the same command resumes: completed
shards are kept, a shard is written under a temporary name and renamed only when complete, and
completed videos are skipped. What is already there is checked first (file sizes against the
offset indexes, record counts against the manifest; with --verify every CRC too): an index that is
missing or damaged is rebuilt from its shard, a shard that is missing, cut short or damaged is
written again with those after it, and a video's frame count is corrected to what its shards hold;
each repair is one printed line naming the file and why. Videos that fail (missing, not a video,
truncated, no decodable frames) are reported one line each, the others are still converted, and the
exit status is 1; an unusable --out folder is one line and exit status 2.
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
import numpy as np
from PIL import Image
import tqdm

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
      for shard in entry["shards"]:
        for name in (shard["file"], shard["file"] + tfrecord.INDEX_SUFFIX):
          if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
      manifest["videos"].remove(entry)
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
      entry = {"id": video_id, "source": os.path.abspath(path), "source_bytes": source_bytes,
               "fps": fps, "complete": False, "frames_decoded": 0, "frames_kept": 0,
               "frames_dropped_blank": 0, "frames_skipped": 0, "num_frames": 0,
               "height": None, "width": None, "source_height": stream.height,
               "source_width": stream.width, "shards": []}
      manifest["videos"].append(entry)
    if entry["shards"]:  # Counters as they were when the last complete shard was written.
      entry.update(entry["shards"][-1]["counts_after"])
      resume_after = entry["shards"][-1]["last_frame_index"]
    else:
      entry.update(frames_decoded=0, frames_kept=0, frames_dropped_blank=0, frames_skipped=0)
      resume_after = -1
    total = stream.frames
    if not total and stream.duration and fps:
      total = int(round(float(stream.duration * stream.time_base) * fps))
    set_total(total or None)
    writer, shard_name, first_index = None, None, None
    counts = ("frames_decoded", "frames_kept", "frames_dropped_blank", "frames_skipped")

    def finish_shard(last_index: int) -> None:
      nonlocal writer
      writer.close()
      final = os.path.join(out_dir, shard_name)
      # The index first: a shard file present under its final name always has its index.
      os.replace(final + ".tmp" + tfrecord.INDEX_SUFFIX, final + tfrecord.INDEX_SUFFIX)
      os.replace(final + ".tmp", final)
      entry["shards"].append({
          "file": shard_name, "num_records": len(writer.offsets), "first_frame_index": first_index,
          "last_frame_index": last_index, "counts_after": {k: entry[k] for k in counts}})
      entry["num_frames"] = entry["frames_kept"]
      manifest_lib.save(out_dir, manifest)
      writer = None

    frame_index, last_kept = -1, resume_after
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
        if writer is None:
          shard_name = f"{video_id}-{len(entry['shards']):05d}.tfrecord"
          temp = os.path.join(out_dir, shard_name + ".tmp")
          writer = tfrecord.TFRecordWriter(temp, temp + tfrecord.INDEX_SUFFIX)
          first_index = frame_index
        timestamp = frame.time if frame.time is not None else frame_index / (fps or 1.0)
        writer.write(tfrecord.encode_frame(
            video_id=video_id, frame_index=frame_index, timestamp=timestamp,
            jpeg=_encode_jpeg(rgb, options.quality), height=height, width=width))
        entry["frames_kept"] += 1
        entry["height"], entry["width"] = height, width
        last_kept = frame_index
        if len(writer.offsets) == options.frames_per_shard:
          finish_shard(frame_index)
    except BaseException as e:
      if writer is not None:  # Drop the unfinished shard; the complete ones stay listed.
        writer.close()
        for temp in (writer.path, writer.index_path):
          if os.path.exists(temp):
            os.remove(temp)
      if isinstance(e, av.FFmpegError):
        if frame_index < 0:
          raise ConversionError(f"video '{path}' has 0 decodable frames ({e.strerror or e})"
                                ) from None
        raise ConversionError(
            f"video '{path}' is truncated or corrupt: decoding failed after frame {frame_index} "
            f"({e.strerror or e}); its complete shards are kept") from None
      raise
    if writer is not None:
      finish_shard(last_kept)
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


def convert(videos: Sequence[str], out_dir: str, *, every: int = 1, short_side: int = 512,
            quality: int = 90, frames_per_shard: int = 1000, blank_threshold: float = 2.0,
            progress: bool = True, verify: bool = False,
            errors: list[str] | None = None,
            report: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Converts `videos` into shards in `out_dir` and returns the manifest.

  Each failing video gives a one-line message; the other videos are still converted. The messages
  are appended to `errors` when it is given, otherwise the first raises ConversionError at the end.
  Errors about the output folder (not a writable folder, another dataset's manifest, other
  options) raise at once. Each file rewritten to repair the data already there (an index rebuilt,
  a damaged shard converted again, a frame count corrected) is one line to `report` (default:
  printed).
  """
  options = Options(every=every, short_side=short_side, quality=quality,
                    frames_per_shard=frames_per_shard, blank_threshold=float(blank_threshold))
  options.check()
  if not videos:
    raise ConversionError("no videos given")
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
    for path in videos:
      video_id = video_id_for(path)
      if video_id in ids:
        failures.append(f"videos '{ids[video_id]}' and '{path}' would share the id '{video_id}'; "
                        "rename one")
        continue
      ids[video_id] = path
      bar.set_description(video_id)

      try:
        convert_video(path, out_dir, manifest, options, video_id=video_id, verify=verify,
                      on_frame=bar.update, set_total=lambda n: bar.reset(total=n), report=report)
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
