"""The grain input pipeline: shards -> clips -> views -> host-local uint8 batches.

    MapDataset.source(ClipSource)      clip j -> its T JPEGs (offset-index reads, CRCs checked)
      .seed(seed).shuffle()            global shuffle of all clips of the selected videos
      .repeat()                        endless; each epoch reshuffled (seed folded with the epoch)
      .random_map(ClipViews)           decode + views, from the rng grain derives from the index
      HostShare                        this host's share: of each global batch of clips, the
                                       contiguous block the host's devices hold
      .to_iter_dataset(threads)        data.num_threads per process overlap clips
      .mp_prefetch(num_workers)        worker processes (spawned; they never touch jax; they exit
                                       when the process that started them dies, even by SIGKILL)
      .batch(batch_size)               this host's batch (the global batch / process_count)

Every random choice is a function of (seed, position in the global stream), so the same seed
gives the same batches whatever data.num_workers is, the global batch is the same whatever the
number of processes (process p holds rows [p*b, (p+1)*b) of it, as
`jax.make_array_from_process_local_data` places them), and the iterator state (a small JSON
dict: positions per worker) restores exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Any

import grain
import numpy as np

from dora_jax.data import manifest as manifest_lib
from dora_jax.data import source as source_lib
from dora_jax.data import views as views_lib


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """Which clips a run trains on: computed once per start by `plan_clips`, then passed on.

  Attributes:
    data_dir: the folder `dora-convert` wrote.
    videos: the manifest entries of the selected videos, in order.
    index: clip j -> (video number, stored frame numbers); `index.span` stored frames per clip.
  """
  data_dir: str
  videos: tuple[dict[str, Any], ...]
  index: source_lib.ClipIndex

  @property
  def num_clips(self) -> int:
    """Clips in one epoch: valid clip starts summed over the selected videos."""
    return len(self.index)


def plan_clips(data_config: Any) -> ClipPlan:
  """Reads the manifest of `data.dir` once and checks the data config against it.

  Raises:
    ValueError: one line naming the folder, file or `data.*` key that is wrong and what to do.
  """
  data_dir = str(data_config.dir)
  videos = manifest_lib.select_videos(manifest_lib.load(data_dir), tuple(data_config.video_ids),
                                      data_dir, int(data_config.get("num_videos", 0)))
  source_lib.check_data(data_dir, videos)  # Before the frame counts below are trusted.
  frames_per_clip, stride = data_config.frames_per_clip, data_config.frame_stride
  if not isinstance(frames_per_clip, (int, np.integer)) or frames_per_clip < 1:
    raise ValueError(f"data.frames_per_clip must be an integer >= 1, got {frames_per_clip!r}")
  if not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"data.frame_stride must be an integer >= 1, got {stride!r}")
  images = [v for v in videos if manifest_lib.kind(v) == manifest_lib.IMAGES]
  if images and frames_per_clip > 1:
    raise ValueError(
        f"'{manifest_lib.path_of(data_dir)}' lists images, not video frames ('{images[0]['id']}'),"
        f" and data.frames_per_clip={frames_per_clip} asks for clips of several frames; use "
        "data.frames_per_clip=1 (config_base.dino_baseline) or select videos (data.video_ids)")
  index = source_lib.ClipIndex(tuple(int(v["num_frames"]) for v in videos), int(frames_per_clip),
                               int(stride))
  longest = max(videos, key=lambda v: v["num_frames"])
  if index.span > longest["num_frames"]:
    raise ValueError(
        f"data.frames_per_clip={frames_per_clip} at data.frame_stride={stride} spans "
        f"{index.span} stored frames, but the longest video in '{data_dir}' ('{longest['id']}') "
        f"has {longest['num_frames']}; lower data.frames_per_clip or data.frame_stride")
  smallest = min(videos, key=lambda v: min(v["height"], v["width"]))
  pre_size = data_config.global_pre_size
  if not isinstance(pre_size, (int, np.integer)) or pre_size < 0:
    raise ValueError(f"data.global_pre_size must be an integer >= 0 (0: no pre-crop), got "
                     f"{pre_size!r}")
  if pre_size > min(smallest["height"], smallest["width"]):
    raise ValueError(
        f"data.global_pre_size={pre_size} is larger than the stored frames "
        f"{smallest['width']}x{smallest['height']} (smallest of '{smallest['id']}'); lower it or "
        "re-run dora-convert with a larger --short-side")
  for key in ("global_size", "local_size"):
    if data_config[key] <= 0 or (pre_size and data_config[key] > pre_size):
      raise ValueError(f"data.{key}={data_config[key]} must be in (0, data.global_pre_size="
                       f"{pre_size}] (any size > 0 when global_pre_size is 0)")
  if data_config.global_crops_per_frame not in (1, 2):
    raise ValueError(f"data.global_crops_per_frame={data_config.global_crops_per_frame!r} must "
                     "be 1 (DoRA: one crop per clip) or 2 (DINO: two crops per frame)")
  if data_config.num_local_crops < 0:
    raise ValueError(f"data.num_local_crops must be >= 0, got {data_config.num_local_crops}")
  for key in ("global_pre_scale", "global_scale", "local_scale"):
    low, high = data_config[key]
    if not 0 < low <= high <= 1:
      raise ValueError(f"data.{key}={tuple(data_config[key])} must be (low, high) with "
                       "0 < low <= high <= 1")
  for key in ("flip_prob", "local_flip_prob", "color_jitter_prob", "grayscale_prob",
              "global_blur_prob", "second_global_blur_prob", "second_global_solarize_prob",
              "local_blur_prob"):
    if not 0 <= data_config[key] <= 1:
      raise ValueError(f"data.{key}={data_config[key]} must be a probability in [0, 1]")
  if data_config.num_workers < 0:
    raise ValueError(f"data.num_workers must be >= 0, got {data_config.num_workers}")
  if data_config.num_threads < 1:
    raise ValueError(f"data.num_threads must be >= 1, got {data_config.num_threads}")
  return ClipPlan(data_dir, tuple(videos), index)


class HostShare(grain.MapDataset):
  """Process p's share of a global stream batched by `process_count * batch_size`.

  Element k of the share is element (k // b * P + p) * b + k % b of the stream (b = batch_size,
  P = process_count): the hosts' batches, stacked in process order, are the global batch a
  single process would make.
  """

  def __init__(self, parent: grain.MapDataset, *, batch_size: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if batch_size < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"batch_size={batch_size} must be >= 1 and process_index={process_index} "
                       f"in [0, process_count={process_count})")
    self._batch_size = batch_size
    self._process_index = process_index
    self._process_count = process_count
    self._length = len(parent) // process_count

  def __len__(self) -> int:
    return self._length

  def parent_index(self, index: int) -> int:
    batch, offset = divmod(int(index), self._batch_size)
    return (batch * self._process_count + self._process_index) * self._batch_size + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return (f"HostShare(process {self._process_index} of {self._process_count}, "
            f"{self._batch_size} clips per batch)")


def make_dataset(plan: ClipPlan, data_config: Any, *, seed: int, batch_size: int = 1,
                 process_index: int = 0, process_count: int = 1,
                 with_clip_ids: bool = False) -> grain.MapDataset:
  """This host's endless MapDataset of clip views (unbatched), {'frames', 'crops'} per clip
  (and 'second_frames' with two global crops per frame).

  `batch_size` is the per-process batch: it sets which clips of the global stream are this
  host's (`HostShare`). With `with_clip_ids` each element also has 'video' and 'frames' (see
  `views.ClipViews`).
  """
  clips = source_lib.ClipSource(plan.data_dir, plan.videos, plan.index.frames_per_clip,
                                plan.index.frame_stride)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  dataset = (grain.MapDataset.source(clips).seed(int(seed)).shuffle().repeat(None)
             .random_map(views_lib.ClipViews(views_lib.ViewConfig.from_config(data_config),
                                             with_clip_ids)))
  # After the random map, so the views of a clip depend on its place in the global stream only.
  if process_count == 1:
    return dataset
  return HostShare(dataset, batch_size=batch_size, process_index=process_index,
                   process_count=process_count)


def make_train_iterator(plan: ClipPlan, data_config: Any, *, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """An endless iterator of this host's batches (see the module docstring).

  Args:
    plan: from `plan_clips`.
    data_config: the `data` section (views, workers, threads, prefetch).
    batch_size: clips per batch of THIS process (the global batch / process_count).
    seed, process_index, process_count: the global stream and this host's share of it.

  Yields {'frames': uint8 (B, T, S, S, 3), 'crops': uint8 (B, T, M, s, s, 3)} with B =
  batch_size ('crops' absent when data.num_local_crops == 0), and 'second_frames' uint8
  (B, T, S, S, 3), DINO's second global crops, when data.global_crops_per_frame == 2. The
  iterator has `get_state() -> dict` (JSON-serialisable) and `set_state(dict)`.
  """
  dataset = make_dataset(plan, data_config, seed=seed, batch_size=batch_size,
                         process_index=process_index, process_count=process_count)
  num_workers = int(data_config.num_workers)
  buffer = int(data_config.prefetch_buffer_size)
  threads = int(data_config.num_threads)
  # Clips, not batches, cross from the workers (worker w makes clips w, w + W, ... and they are
  # interleaved back in order), so batch k holds the same clips whatever data.num_workers is, and
  # a worker holds a few clips, not whole batches, in memory. Batching happens here.
  clips_ahead = max(1, buffer) * batch_size  # Clips prepared ahead, over all workers.
  per_process = -(-clips_ahead // max(1, num_workers))
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, per_process)))
  if num_workers > 0:
    iter_dataset = in_worker_processes(iter_dataset, grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=per_process))
  return iter(iter_dataset.batch(batch_size, drop_remainder=True))


def in_worker_processes(iter_dataset: grain.IterDataset,
                        options: grain.MultiprocessingOptions) -> grain.IterDataset:
  """`iter_dataset` prefetched by grain worker processes that exit with the process that started
  them (dora-train's and dora-finetune's input workers alike)."""
  _ensure_absl_flags_parsed()
  return iter_dataset.mp_prefetch(
      options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))


_PARENT_POLL_SECONDS = 0.5  # How often a worker checks that the trainer is alive.


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker init: the worker exits once `parent_pid`, the trainer that spawned it, is gone.

  grain stops its workers when the iterator is closed or the trainer exits normally; a trainer
  killed (SIGKILL, the OOM killer) runs no cleanup, and its workers (with the resource tracker
  they share) would live on under PID 1. A daemon thread in each worker polls its parent pid,
  which changes when the parent dies. (Not PR_SET_PDEATHSIG: it fires when the *thread* that
  spawned the worker exits, and grain spawns workers from its own pool threads.)
  """
  del worker_index, worker_count  # grain's signature; every worker does the same.

  def watch() -> None:
    while os.getppid() == parent_pid:
      time.sleep(_PARENT_POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  # No cleanup left to wait for: it is gone.

  threading.Thread(target=watch, name="dora-exit-with-parent", daemon=True).start()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) mark them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
