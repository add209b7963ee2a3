r"""DAVIS label propagation per frame: every pair of patches (dense) against the window only.

  python benchmarks/davis_propagation.py [--frames 9] [--repeats 5] [--tiles 4 8 12]

A ViT-S/16 (random weights) encodes --frames copies of one 480 x 854 DAVIS-sized frame, each
shifted 8 px to the right of the one before, resized as `dora-eval davis` does (480 x 832: a
30 x 52 = 1560-patch grid); `propagation.propagate_dense` and `propagation.propagate` (one row per
--tiles value) then propagate four random objects of frame 0 through them with DINO's settings
(queue of 7, window of 12 patches, top-5, temperature 0.1). Reported: the median over --repeats
runs of the seconds per propagated frame after a compiling run, the float32 affinities one frame
holds at once (dense: all of them; windowed: one block's, the blocks run one after another), the
backbone's seconds per frame for scale, and how far the soft labels and their arg-max are from
the dense ones. Not a test: timings
depend on the machine; record them with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from flax import nnx
import jax
import numpy as np
from PIL import Image

from dora_jax.evaluation import davis
from dora_jax.evaluation import features as features_lib
from dora_jax.evaluation import propagation
from dora_jax.models import vit

FRAME = (480, 854)  # DAVIS-2017 480p.
PATCH = 16


def _frames(count: int) -> np.ndarray:
  """(count, 480, 832, 3) uint8: a smooth random picture moving 8 px per frame, resized."""
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, size=(FRAME[0] // 32, FRAME[1] // 32 + 1, 3), dtype=np.uint8)
  picture = np.asarray(Image.fromarray(coarse).resize((FRAME[1] + 32, FRAME[0]), Image.BICUBIC))
  size = davis.frame_size(*FRAME)
  return np.stack([np.asarray(Image.fromarray(np.roll(picture, 8 * t, axis=1)[:, :FRAME[1]])
                              .resize(size[::-1], Image.BILINEAR)) for t in range(count)])


def _median_seconds(runs: list, repeats: int) -> list[float]:
  """The median seconds of each function; one run of each in turn, so that the load of a shared
  machine falls on all of them alike."""
  for run in runs:
    jax.block_until_ready(run())  # Compiles.
  times = [[] for _ in runs]
  for _ in range(repeats):
    for run, seconds in zip(runs, times):
      start = time.perf_counter()
      jax.block_until_ready(run())
      seconds.append(time.perf_counter() - start)
  return [statistics.median(seconds) for seconds in times]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=9, help="Frame 0 and the frames propagated.")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tiles", type=int, nargs="+", default=[propagation.WINDOW_TILE])
  args = parser.parse_args()
  settings = davis.PropagationSettings()
  frames = _frames(args.frames)
  grid = (frames.shape[1] // PATCH, frames.shape[2] // PATCH)
  model = vit.VisionTransformer("S/16", img_size=224, rngs=nnx.Rngs(0))
  encoder = features_lib.Encoder(model, ("tokens",))
  encode = lambda: encoder(frames[:1])["tokens"]
  backbone_seconds, = _median_seconds([encode], max(1, args.repeats // 2))
  tokens = np.concatenate([np.asarray(encoder(frame[None])["tokens"]) for frame in frames])
  objects = np.asarray(Image.fromarray(np.random.default_rng(1).integers(
      0, 4, size=(3, 5), dtype=np.uint8)).resize(grid[::-1], Image.NEAREST))
  first = np.eye(4, dtype=np.float32)[objects.reshape(-1)]
  kwargs = dict(grid=grid, radius=settings.size_mask_neighborhood,
                n_last_frames=settings.n_last_frames, topk=settings.topk,
                temperature=settings.temperature)
  num_sources = 1 + settings.n_last_frames
  runs = [lambda: propagation.propagate_dense(tokens, first, **kwargs)]
  runs += [lambda tile=tile: propagation.propagate(tokens, first, tile=tile, **kwargs)
           for tile in args.tiles]
  names = ["dense (N x N, masked)"] + [f"windowed, tile {tile}" for tile in args.tiles]
  held = [num_sources * (grid[0] * grid[1]) ** 2]
  held += [tile * tile * num_sources * (tile + 2 * settings.size_mask_neighborhood) ** 2
           for tile in args.tiles]
  soft = [np.asarray(run()) for run in runs]
  seconds = [s / (args.frames - 1) for s in _median_seconds(runs, args.repeats)]

  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}; grid {grid[0]} x {grid[1]} = "
        f"{grid[0] * grid[1]} patches, {args.frames - 1} frames propagated, median of "
        f"{args.repeats}")
  print(f"ViT-S/16 forward on one {frames.shape[1]} x {frames.shape[2]} frame: "
        f"{backbone_seconds:.3f} s")
  print("| propagation | s per frame | dense / this | affinities held at once (MB) | "
        "max abs difference from dense | patches whose arg-max differs |")
  print("|---|---|---|---|---|---|")
  for name, per_frame, affinities, labels in zip(names, seconds, held, soft):
    changed = int(np.sum(labels.argmax(-1) != soft[0].argmax(-1)))
    print(f"| {name} | {per_frame:.3f} | {seconds[0] / per_frame:.2f} | "
          f"{affinities * 4 / 2**20:.1f} | {np.abs(labels - soft[0]).max():.1e} | "
          f"{changed} of {labels.shape[0] * labels.shape[1]} |")


if __name__ == "__main__":
  main()
