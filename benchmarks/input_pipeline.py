r"""Input pipeline throughput: clips per second per core, beside the reference approach.

  python benchmarks/input_pipeline.py [--workdir /tmp/dora_bench] [--rounds 6]

Makes a 640x360, 60 fps synthetic walking tour (cached in --workdir), converts it with
dora-convert, then alternates, in one process on one core:
  ours       the pipeline's MapDataset (offset-index read, CRC check, JPEG decode, views, batch),
             one batch of --batch clips at a time, synchronously (no prefetch thread, no workers);
  reference  what the public DoRA code does per sample: open the mp4, seek to and decode each of
             the T frames (single-threaded decoder), then the same views.
Both use the paper's settings (T=8 frames 60 apart, M=6 local crops, 300/224/112 px, jitter...).
Reports, per clip, the median CPU seconds of the process (the cost on one core, robust to other
load on a shared machine) and the median wall seconds of each, and their ratios; with --workers N
also the clips/s of `make_train_iterator` with N worker processes on this machine.
Not a test: timings depend on the machine; record them in BENCHMARKS.md with the machine.
"""
from __future__ import annotations

import argparse
import fractions
import json
import os
import platform
import statistics
import time

import av
import numpy as np

from dora_jax import config_base
from dora_jax.data import convert
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import pipeline
from dora_jax.data import source
from dora_jax.data import synthetic
from dora_jax.data import views


def paper_data_config(data_dir: str):
  config = config_base.get_base_config().data  # The paper's views: T=8, stride 60, M=6, ...
  config.dir = data_dir
  config.num_workers = 0
  return config


def reference_frames(path: str, frames: np.ndarray) -> list:
  """Opens the video and seeks to and decodes each frame (single-threaded decoder): PIL images."""
  images = []
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1  # One core, like ours.
    fps = float(stream.average_rate)
    for frame_number in frames:
      target = frame_number / fps
      container.seek(int(target / stream.time_base), stream=stream, backward=True,
                     any_frame=False)
      for frame in container.decode(stream):
        if frame.time >= target - 0.5 / fps:
          images.append(frame.to_image())
          break
  return images


def reference_clip(path: str, frames: np.ndarray, rng, view_config) -> dict:
  """The reference approach: decode the clip's frames from the video, make the same views."""
  images = reference_frames(path, frames)
  return views.clip_views(images, (images[0].height, images[0].width), rng, view_config)


def upscaled_copy(video: str, height: int) -> str:
  """The 640x360 tour re-encoded at `height` (16:9, same GOP and fps), made once."""
  out = video.replace(".mp4", f"_{height}p.mp4")
  if os.path.exists(out):
    return out
  width = height * 16 // 9 // 2 * 2
  with av.open(video) as src, av.open(out + ".tmp.mp4", "w") as dst:
    stream = dst.add_stream("libx264", rate=60)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": "18"}
    for index, frame in enumerate(src.decode(video=0)):
      image = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
      image.pts, image.time_base = index, fractions.Fraction(1, 60)
      for packet in stream.encode(image):
        dst.mux(packet)
    for packet in stream.encode():
      dst.mux(packet)
  os.replace(out + ".tmp.mp4", out)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/dora_bench")
  parser.add_argument("--num_frames", type=int, default=900, help="Video length (60 fps).")
  parser.add_argument("--rounds", type=int, default=6, help="Alternations ours/reference.")
  parser.add_argument("--batch", type=int, default=4, help="Clips per batch of ours per round.")
  parser.add_argument("--reference_clips", type=int, default=2, help="Reference clips per round.")
  parser.add_argument("--workers", type=int, default=0, help="Also time N worker processes.")
  parser.add_argument("--source_height", type=int, default=360,
                      help="Re-encode the tour at this height (16:9) first, e.g. 1080, to see how "
                      "the reference scales with the source; the shards keep dora-convert's "
                      "default short side (512).")
  args = parser.parse_args()

  os.makedirs(args.workdir, exist_ok=True)
  video = os.path.join(args.workdir, "tour640.mp4")
  if not os.path.exists(video):
    start = time.perf_counter()
    synthetic.generate_walking_tour(video, num_frames=args.num_frames, width=640, height=360,
                                    fps=60, num_objects=5, seed=0)
    print(f"generated {video} in {time.perf_counter() - start:.0f} s")
  if args.source_height != 360:
    video = upscaled_copy(video, args.source_height)
  data_dir = os.path.join(args.workdir, f"shards{args.source_height}")
  cached = os.path.exists(manifest_lib.path_of(data_dir))
  start = time.perf_counter()
  manifest = convert.convert([video], data_dir, progress=False)
  convert_s = time.perf_counter() - start
  entry = manifest["videos"][0]
  result_convert = {} if cached else {
      "convert_frames_per_s": round(entry["frames_decoded"] / convert_s, 1)}
  print(f"dora-convert: {entry['frames_kept']} frames {entry['width']}x{entry['height']} "
        f"({'cached' if cached else f'{convert_s:.1f} s'})")

  config = paper_data_config(data_dir)
  plan = pipeline.plan_clips(config)
  view_config = views.ViewConfig.from_config(config)
  ours = pipeline.make_dataset(plan, config, seed=0).batch(args.batch)
  clips = source.ClipIndex((entry["num_frames"],), config.frames_per_clip, config.frame_stride)
  size = (entry["height"], entry["width"])
  rng = np.random.default_rng(0)
  decode_rng = np.random.default_rng(1)  # Own stream: the reference's clips stay as before.

  # Sanity: the reference decodes the frames we stored (JPEG tolerance).
  store = source.FrameStore(data_dir, [entry])
  _, frames = clips.frames(5)
  for image, frame in zip(reference_frames(video, frames[:2]), frames[:2]):
    ours_frame = np.asarray(views._decode(store.read_jpeg(0, int(frame)), size, 1.0)[0], int)
    theirs = np.asarray(image.resize(size[::-1], views.Image.BILINEAR), int)
    mismatch = float(np.abs(ours_frame - theirs).mean())
    assert mismatch < 4, f"reference decodes other frames than ours (mean abs diff {mismatch})"

  ours[0]  # Warm-up (imports, first file opens).
  ours_wall, ours_cpu, reference_wall, reference_cpu, decode_cpu = [], [], [], [], []
  for round_index in range(args.rounds):
    wall, cpu = time.perf_counter(), time.process_time()
    batch = ours[round_index + 1]
    ours_wall.append((time.perf_counter() - wall) / args.batch)
    ours_cpu.append((time.process_time() - cpu) / args.batch)
    # Where ours goes: the read + full-size JPEG decode share of a clip (the rest is the views).
    _, frames = clips.frames(int(decode_rng.integers(len(clips))))
    cpu = time.process_time()
    for frame in frames:
      views._decode(store.read_jpeg(0, int(frame)), size, 1.0)
    decode_cpu.append(time.process_time() - cpu)
    for _ in range(args.reference_clips):
      _, frames = clips.frames(int(rng.integers(len(clips))))
      wall, cpu = time.perf_counter(), time.process_time()
      reference_clip(video, frames, rng, view_config)
      reference_wall.append(time.perf_counter() - wall)
      reference_cpu.append(time.process_time() - cpu)
  assert batch["frames"].shape == (args.batch, 8, 224, 224, 3)
  assert batch["crops"].shape == (args.batch, 8, 6, 112, 112, 3)
  median = statistics.median
  result = {
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"load average {os.getloadavg()[0]:.1f}",
      "video": f"{entry['source_width']}x{entry['source_height']} 60 fps, "
               f"{entry['frames_kept']} frames, stored {entry['width']}x{entry['height']}",
      # CPU seconds of this process per clip: the cost on one core, robust to a shared machine.
      "ours_cpu_s_per_clip": round(median(ours_cpu), 4),
      "reference_cpu_s_per_clip": round(median(reference_cpu), 4),
      "ratio_cpu": round(median(reference_cpu) / median(ours_cpu), 1),
      "ours_clips_per_s_per_core": round(1 / median(ours_cpu), 2),
      "ours_read_decode_cpu_s_per_clip": round(median(decode_cpu), 4),
      "ours_wall_s_per_clip": round(median(ours_wall), 4),
      "reference_wall_s_per_clip": round(median(reference_wall), 4),
      "ratio_wall": round(median(reference_wall) / median(ours_wall), 1),
      "samples": {"ours_batches": len(ours_wall), "ours_clips_per_batch": args.batch,
                  "reference_clips": len(reference_wall)},
      **result_convert,
  }
  if args.workers:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flags.FLAGS.mark_as_parsed()
    config.num_workers = args.workers
    iterator = pipeline.make_train_iterator(plan, config, batch_size=16, seed=0)
    next(iterator)  # Start-up (spawning the workers) is not throughput.
    start, count = time.perf_counter(), 0
    for _ in range(6):
      count += len(next(iterator)["frames"])
    result[f"workers_{args.workers}_clips_per_s"] = round(count / (time.perf_counter() - start), 2)
    iterator.close()
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
