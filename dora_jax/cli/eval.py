"""`dora-eval`: evaluates a trained encoder (the teacher of a `dora-train` run).

  dora-eval knn   --checkpoint RUN --train SRC --val SRC --out DIR [--k 20 --temperature 0.07]
  dora-eval davis --checkpoint RUN --data DAVIS_ROOT --out DIR [--sequences bear dog ...]
  dora-eval track --checkpoint RUN --data SYNTHETIC_TOUR --out DIR [--clips 16 ...]
  dora-eval seg   --checkpoint RUN --data ADE_ROOT --out DIR [--iterations 40000 --blocks 1 ...]
  dora-eval discover --checkpoint RUN --data VOC_ROOT --out DIR [--split trainval --k-patches 100]

RUN: a work folder (its latest checkpoint) or one of its checkpoints/STEP folders. SRC: an image
folder (ROOT/CLASS/IMAGE) or tfds:NAME:SPLIT (read with tfds.data_source, no TensorFlow;
--tfds-data-dir). SYNTHETIC_TOUR: the .mp4 of `dora_jax.data.synthetic` (masks beside it) or its
folder. ADE_ROOT: the ADE20K layout (images/ and annotations/, each with training/ and
validation/), or --train/--val tfds:NAME:SPLIT with a 'segmentation_mask'. VOC_ROOT: a PASCAL
VOC2007/2012 folder (JPEGImages, Annotations, ImageSets/Main). Each writes a JSON report in DIR
(knn.json, davis_metrics.json with the masks and pictures, track.json, seg_metrics.json with
pred/, pictures/ and the readout, discover.json with pictures) and prints a summary. Bad input: a
one-line error and exit status 2. The flags that a training config also has (the DoRA kernels,
the clips) default to config_base.py's values.

Each subcommand is an evaluator of `dora_jax.evaluation.registry` (the module of the same name
owns its flags, its run, its report and its summary line); this file only loads the checkpoint,
runs it and writes the report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from dora_jax import config_base
from dora_jax.evaluation import registry

GENERIC_FLAGS = ("command", "checkpoint", "out", "no_progress")  # The rest: the evaluator's.


class InputError(Exception):
  """Bad input found by the command line; the message is one line."""


def load_backbone(path: str):
  """The one place that loads a trained encoder."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from dora_jax.pretrained import load_backbone as load  # pylint: disable=g-import-not-at-top

  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns about the read-only restore it is asked for.
  try:
    return load(path)
  except FileNotFoundError as e:
    raise InputError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # A checkpoint of another model, or files orbax cannot read.
    lines = str(e).strip().splitlines() or [type(e).__name__]
    raise InputError(f"cannot load --checkpoint {path}: {lines[0]}") from None
  finally:
    logging.set_verbosity(verbosity)


def write_report(path: str, report: Any) -> None:
  """The JSON report of every evaluation, written whole (a temporary file renamed)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def evaluate(args: argparse.Namespace) -> str:
  """Runs the evaluator `args.command` on the checkpoint; writes its report; the summary line."""
  module = registry.module(args.command)
  values = {key: value for key, value in vars(args).items() if key not in GENERIC_FLAGS}
  # The data is read and checked first: a bad path fails before the checkpoint loads.
  evaluator = module.Evaluator(values, name_of=registry.flag_namer)
  backbone = load_backbone(args.checkpoint)
  evaluator.check(backbone.size)
  report = evaluator.run(backbone, out_dir=args.out, progress=not args.no_progress)
  report["checkpoint"] = os.path.abspath(args.checkpoint)
  path = os.path.join(args.out, module.REPORT_FILE)
  write_report(path, report)
  return f"{evaluator.summary(report)} -> {path}"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; with `command`, only that evaluator's module is imported (for its flags), and
  with "" none (`dora-eval --help`, a mistyped command: no jax to import)."""
  base = config_base.get_base_config()
  parser = argparse.ArgumentParser(
      prog="dora-eval", description="Evaluate the teacher of a dora-train run.")
  commands = parser.add_subparsers(dest="command", required=True,
                                   metavar="{" + ",".join(registry.TYPES) + "}")
  for name in registry.TYPES:
    if command not in (None, name):
      commands.add_parser(name)  # Parsing another command never reads this one's flags.
      continue
    module = registry.module(name)
    sub = commands.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
    sub.add_argument("--checkpoint", required=True,
                     help="A dora-train work folder (latest checkpoint) or its checkpoints/STEP.")
    sub.add_argument("--out", required=True, help="Folder for the JSON report (and outputs).")
    sub.add_argument("--no-progress", action="store_true", help="No progress bar.")
    module.add_flags(sub, base)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[0] if argv and argv[0] in registry.TYPES else ""
  args = build_parser(command).parse_args(argv)
  module = registry.module(args.command)
  try:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise InputError(f"--out {args.out} is a file; expected a folder for the report.")
    summary = evaluate(args)
  except (InputError, registry.SettingError, *module.ERRORS) as e:
    print(f"dora-eval {args.command}: error: {e}", file=sys.stderr)
    return 2
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
