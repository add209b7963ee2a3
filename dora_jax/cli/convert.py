"""dora-convert: decode videos and images once into TFRecord shards of JPEG frames
(+ manifest.json)."""
import argparse
import sys
from typing import Sequence

from dora_jax.data import convert as convert_lib


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="dora-convert",
      description="Decode videos and images once into TFRecord shards of JPEG frames "
      "(+ manifest.json).")
  parser.add_argument(
      "inputs", nargs="+", metavar="INPUT",
      help="Video files (anything FFmpeg reads), image folders (ROOT/IMAGE or ROOT/CLASS/IMAGE: "
      "every image a frame, in sorted path order) or tfds:NAME:SPLIT (a tfds split prepared as "
      "array_record), mixed as you like.")
  parser.add_argument("--out", required=True, help="Output folder for shards and manifest.json.")
  parser.add_argument("--every", type=int, default=1, help="Keep every n-th frame (default 1).")
  parser.add_argument("--short-side", type=int, default=512,
                      help="Resize so the shorter side is S pixels; never upscales (default 512).")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90).")
  parser.add_argument("--frames-per-shard", type=int, default=1000,
                      help="Stored frames per shard (default 1000).")
  parser.add_argument("--blank-threshold", type=float, default=2.0,
                      help="Drop frames whose luma std (0-255) is below this; 0 keeps all "
                      "(default 2).")
  parser.add_argument("--verify", action="store_true",
                      help="Check every CRC of the shards already written (else only their "
                      "sizes); damaged shards are converted again.")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  args = parser.parse_args(argv)
  errors: list[str] = []
  try:
    manifest = convert_lib.convert(args.inputs, args.out, every=args.every, short_side=args.short_side,
                       quality=args.quality, frames_per_shard=args.frames_per_shard,
                       blank_threshold=args.blank_threshold, progress=not args.no_progress,
                       verify=args.verify, errors=errors)
  except (convert_lib.ConversionError, OSError) as e:  # OSError: the output folder failing mid-way (full).
    print(f"dora-convert: error: {e}", file=sys.stderr)
    return 2
  for error in errors:
    print(f"dora-convert: error: {error}", file=sys.stderr)
  for video in manifest["videos"]:
    if video["complete"]:
      unreadable = (f", {video['frames_unreadable']} unreadable skipped"
                    if "frames_unreadable" in video else "")
      print(f"{video['id']}: {video['frames_kept']} frames kept, "
            f"{video['frames_dropped_blank']} blank dropped, {video['frames_skipped']} skipped "
            f"(--every){unreadable}, {len(video['shards'])} shards")
  if errors:
    print(f"dora-convert: {len(errors)} errors for {len(args.inputs)} inputs (see above); "
          "re-run to resume a failed input, fix an unreadable image and convert into a new --out "
          "to include it", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
