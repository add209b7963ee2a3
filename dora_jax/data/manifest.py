"""`manifest.json`: what `dora-convert` stored in a data folder, and which videos a run uses.

The manifest is a JSON object {"format", "options", "videos": [entry, ...]}; an entry describes
one video: id, `kind`, source, fps, frame counts, stored size, `complete`, and its shards
({"file", "num_records", ...}). `kind` is "video" (frames in time order; entries without `kind`
are videos) or "images" (an image folder or a tfds split: every image a frame, in no time order,
each of its own size; the entry's height and width are those of its image with the shortest
side), which trains one frame per clip only. `dora-convert` writes it (atomically, after every shard); training reads it
once per start.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from dora_jax import paths

FILE_NAME = "manifest.json"
FORMAT = "dora_jax.frames/1"  # A manifest without this tag is another dataset's.
VIDEO, IMAGES = "video", "images"  # An entry's kind.


def kind(entry: dict[str, Any]) -> str:
  """VIDEO or IMAGES (entries written before images existed are videos)."""
  return entry.get("kind", VIDEO)


def path_of(data_dir: str) -> str:
  return paths.join(data_dir, FILE_NAME)


def read(data_dir: str) -> dict[str, Any] | None:
  """The manifest of `data_dir`, or None when there is none.

  Raises:
    ValueError: the file is not valid JSON or not a dora-convert manifest (one line).
  """
  path = path_of(data_dir)
  if not paths.exists(path):
    return None
  try:
    manifest = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"'{path}' is not a readable JSON manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"'{path}' is another dataset's manifest (no format '{FORMAT}')")
  if not isinstance(manifest.get("videos"), list):
    raise ValueError(f"'{path}' has no list of videos")
  return manifest


def load(data_dir: str) -> dict[str, Any]:
  """The manifest of a data folder to train on.

  Raises:
    ValueError: one line saying what is wrong and to run dora-convert.
  """
  if not data_dir or not paths.isdir(data_dir):
    raise ValueError(f"data.dir '{data_dir}' is not a folder; run `dora-convert VIDEO --out DIR` "
                     "and set data.dir=DIR")
  try:
    manifest = read(data_dir)
  except ValueError as e:
    raise ValueError(f"{e}; re-run dora-convert") from None
  if manifest is None:
    raise ValueError(f"data.dir '{data_dir}' has no {FILE_NAME}; run `dora-convert VIDEO --out "
                     f"{data_dir}` first")
  return manifest


def save(data_dir: str, manifest: dict[str, Any]) -> None:
  """Writes the manifest through a temporary name: readers never see half of it."""
  paths.write_text(path_of(data_dir), json.dumps(manifest, indent=1))


def all_complete(manifest: dict[str, Any] | None) -> bool:
  """Whether the manifest lists videos and every one is completely converted."""
  return bool(manifest and manifest["videos"]) and all(
      v.get("complete") for v in manifest["videos"])


def select_videos(manifest: dict[str, Any], video_ids: Sequence[str], data_dir: str = "?",
                  num_videos: int = 0) -> list[dict[str, Any]]:
  """The entries of `video_ids` (all complete videos when empty), in that order.

  `num_videos` > 0 keeps the first that many of them (config key `data.num_videos`).

  Raises:
    ValueError: an unknown or unfinished video, or too few videos (one line).
  """
  by_id = {v["id"]: v for v in manifest["videos"]}
  if isinstance(video_ids, str):
    video_ids = (video_ids,) if video_ids else ()
  if not video_ids:
    videos = [v for v in manifest["videos"] if v.get("complete")]
    if not videos:
      raise ValueError(f"'{path_of(data_dir)}' has no completely converted video; "
                       "re-run dora-convert")
  else:
    videos = []
    for video_id in video_ids:
      if video_id not in by_id:
        raise ValueError(f"data.video_ids: '{video_id}' is not in '{path_of(data_dir)}' "
                         f"(it has {sorted(by_id)})")
      if not by_id[video_id].get("complete"):
        raise ValueError(f"data.video_ids: video '{video_id}' in '{data_dir}' is not completely "
                         "converted; re-run dora-convert")
      videos.append(by_id[video_id])
  if num_videos:
    if not 0 < num_videos <= len(videos):
      raise ValueError(f"data.num_videos={num_videos}: '{data_dir}' has {len(videos)} "
                       "(selected) videos")
    videos = videos[:num_videos]
  return videos
