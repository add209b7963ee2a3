r"""`dora-export`: a backbone into (and out of) the exported folder that `load_backbone` reads.

From a public PyTorch DINO/DoRA file (a bare backbone state dict, or a training checkpoint whose
`teacher` / `student` entries hold it; needs `pip install -e '.[torch]'`):

  dora-export --torch-checkpoint dino_deitsmall16_pretrain.pth --variant S/16 --out exported/dino_s16
  dora-export --torch-checkpoint checkpoint.pth --key teacher --variant S/16 --out exported/dora_s16

From a `dora-train` run (its work folder: the latest checkpoint; or one `checkpoints/STEP`), the
teacher's backbone, optionally also as a PyTorch state dict under DINO's names, which DINO's
`vit_small` / `vit_base` load with `strict=True`:

  dora-export --checkpoint /ckpt/dora_vits16_venice --out exported/venice \
      --torch-out exported/venice_vits16.pth

The untrained encoder of a config, as the trainer initialises it with that seed (the teacher at
step 0): the random-encoder baseline of an experiment, evaluated like any trained one:

  dora-export --init configs/demo.py --seed 0 --out exported/demo_random_s0

Then `dora_jax.pretrained.load_backbone("exported/venice")` returns the ViT. Everything is written
under temporary names and renamed when complete; on any error (one line, exit status 2) nothing
is written.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from typing import Sequence

from dora_jax.models import vit
from dora_jax.pretrained import export
from dora_jax.pretrained import torch_checkpoint

_MAX_LISTED = 3  # Mismatching names shown in an error line.


class _Error(Exception):
  """A one-line error for the command line."""


def _sha256(file: str) -> str:
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _mismatch_line(error: vit.WeightMismatchError, what: str, size: vit.ViTSize) -> str:
  """One line: the first shape mismatches, then counts of missing and unexpected names."""
  parts = error.mismatched[:_MAX_LISTED]
  if len(error.mismatched) > _MAX_LISTED:
    parts.append(f"... {len(error.mismatched)} shape mismatches in all")
  for label, names in (("missing", error.missing), ("unexpected", error.unexpected)):
    if names:
      parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:_MAX_LISTED])})")
  model = (f"ViT {export.variant_name(size) or 'of custom size'} (dim {size.dim}, depth "
           f"{size.depth}, heads {size.num_heads}, patch {size.patch_size})")
  return (f"the weights in {what} do not match {model}: {'; '.join(parts)}. Pass the variant "
          "the file was trained with (--variant, and --dim/--depth/--num-heads/--patch-size).")


def import_torch_checkpoint(file: str, out_dir: str, *, variant: str, key: str | None = None,
                            sizes: dict[str, int] | None = None) -> dict:
  """A PyTorch `.pth` backbone -> the exported folder `out_dir`; returns its description."""
  out_dir = export.check_new_folder(out_dir)
  try:
    size = vit.resolve_size(variant, **(sizes or {}))
  except ValueError as e:
    raise _Error(str(e)) from None
  checkpoint = torch_checkpoint.load_pth(file)
  weights, used_key = torch_checkpoint.backbone_state_dict(checkpoint, key, file=file)
  what = f"{file}[{used_key!r}]" if used_key else file
  try:
    backbone = vit.from_torch_state_dict(weights, variant, **(sizes or {}))
  except vit.WeightMismatchError as e:
    raise _Error(_mismatch_line(e, what, size)) from None
  source = {"kind": "pytorch", "file": os.path.abspath(file), "key": used_key,
            "sha256": _sha256(file)}
  return export.save_exported(backbone, out_dir, source)


def _run_step(path: str) -> int | None:
  """The checkpoint step `load_backbone(path)` reads: STEP of a step folder, else the latest."""
  from dora_jax import checkpoint  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  if os.path.basename(path).isdigit():
    return int(os.path.basename(path))
  folder = checkpoint.checkpoint_dir(path)
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=None)


def export_run(checkpoint: str, out_dir: str, *, torch_out: str | None = None) -> dict:
  """The teacher backbone of a `dora-train` run -> `out_dir` (and a `.pth` state dict)."""
  from dora_jax.checkpoint import errors  # pylint: disable=g-import-not-at-top
  from dora_jax import pretrained  # pylint: disable=g-import-not-at-top

  out_dir = export.check_new_folder(out_dir)
  if torch_out:
    torch_out = os.path.abspath(torch_out)
    if os.path.exists(torch_out):
      raise _Error(f"{torch_out} already exists: remove it or choose another --torch-out.")
    torch_checkpoint.import_torch(f"--torch-out {torch_out}")
  try:
    backbone = pretrained.load_backbone(checkpoint)
  except (FileNotFoundError, errors.CheckpointMismatchError,
          errors.CheckpointDamagedError) as e:
    raise _Error(str(e)) from None
  if export.is_exported(checkpoint):  # load_backbone reads exported folders too.
    source = export.read_description(checkpoint)["source"]
  else:
    source = {"kind": "dora-train", "checkpoint": os.path.abspath(checkpoint),
              "step": _run_step(checkpoint)}
  tmp_dir = export.temporary_sibling(out_dir, folder=True)
  tmp_pth = export.temporary_sibling(torch_out, folder=False) if torch_out else None
  renamed = []
  try:
    description = export.write_exported(backbone, tmp_dir, source)
    if torch_out:
      torch_checkpoint.save_pth(vit.to_torch_state_dict(backbone), tmp_pth)
      os.rename(tmp_pth, torch_out)
      renamed.append(torch_out)
    os.rename(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for path in [tmp_pth] + renamed:  # The pair is all or nothing.
      if path and os.path.exists(path):
        os.remove(path)
    raise
  return description


def export_init(config_spec: str, out_dir: str, *, seed: int | None = None) -> dict:
  """The teacher backbone of `config_spec` at initialisation (step 0, never trained) -> out_dir."""
  import jax  # pylint: disable=g-import-not-at-top
  from dora_jax import config_base  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import step as train_step  # pylint: disable=g-import-not-at-top

  out_dir = export.check_new_folder(out_dir)
  try:
    config = config_base.load_config_file(config_spec)
  except ValueError as e:
    raise _Error(str(e)) from None
  seed = config.seed if seed is None else seed
  # As the trainer initialises a run: one compiled init from PRNGKey(seed).
  train_plan = plan_lib.TrainPlan.from_config(config)
  graphdef, _ = train_step.abstract_train_state(config, train_plan)
  state = jax.jit(lambda rng: train_step.init_train_state(
      config, train_plan, rng=rng)[1])(jax.random.PRNGKey(seed))
  backbone = train_step.teacher_backbone(graphdef, state)
  tmp_dir = export.temporary_sibling(out_dir, folder=True)
  try:
    description = export.write_exported(backbone, tmp_dir, {
        "kind": "init", "config": config_spec, "seed": int(seed), "step": 0})
    os.rename(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return description


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="dora-export", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--torch-checkpoint", metavar="FILE.pth",
                      help="A PyTorch DINO/DoRA backbone or training checkpoint to import.")
  source.add_argument("--checkpoint", metavar="PATH",
                      help="A dora-train work folder (latest checkpoint) or its checkpoints/STEP.")
  source.add_argument("--init", metavar="CONFIG[:ARG]",
                      help="A config file: its encoder as initialised, never trained.")
  parser.add_argument("--seed", type=int,
                      help="With --init: the initialisation's seed (default: the config's).")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="The exported folder to write (must not exist).")
  parser.add_argument("--key", help="With --torch-checkpoint: the training checkpoint's entry "
                      f"holding the backbone (default: {torch_checkpoint.DEFAULT_KEY}).")
  parser.add_argument("--variant", help="With --torch-checkpoint: the ViT the weights belong to "
                      f"({', '.join(vit.VARIANTS)}).")
  for name in ("dim", "depth", "num-heads", "patch-size"):
    parser.add_argument(f"--{name}", type=int,
                        help=f"With --torch-checkpoint: override the variant's {name}.")
  parser.add_argument("--torch-out", metavar="FILE.pth",
                      help="With --checkpoint: also write a PyTorch state dict under DINO's names.")
  return parser


def _run(args: argparse.Namespace) -> int:
  sizes = {key: getattr(args, key) for key in ("dim", "depth", "num_heads", "patch_size")
           if getattr(args, key) is not None}
  try:
    if args.seed is not None and not args.init:
      raise _Error("--seed goes with --init.")
    if args.torch_checkpoint:
      if args.torch_out:
        raise _Error("--torch-out goes with --checkpoint (a run); the --torch-checkpoint file "
                     "already is a PyTorch file.")
      if not args.variant:
        raise _Error(f"--torch-checkpoint needs --variant (one of {', '.join(vit.VARIANTS)}).")
      description = import_torch_checkpoint(args.torch_checkpoint, args.out,
                                            variant=args.variant, key=args.key, sizes=sizes)
    elif args.init:
      if args.key or args.variant or sizes or args.torch_out:
        raise _Error("--key, --variant, the size flags and --torch-out do not go with --init; "
                     "the config describes the model.")
      description = export_init(args.init, args.out, seed=args.seed)
    else:
      if args.key or args.variant or sizes:
        raise _Error("--key, --variant and the size flags go with --torch-checkpoint; a run's "
                     "checkpoint describes its own model.")
      description = export_run(args.checkpoint, args.out, torch_out=args.torch_out)
  except (_Error, export.ExportError, torch_checkpoint.TorchCheckpointError) as e:
    print(f"dora-export: error: {e}", file=sys.stderr)
    return 2
  name = description["variant"] or (f"dim {description['dim']}, depth {description['depth']}, "
                                    f"{description['num_heads']} heads, patch "
                                    f"{description['patch_size']}")
  print(f"dora-export: wrote {os.path.abspath(args.out)} (ViT {name}, {description['img_size']}"
        f"-px training images)" + (f" and {os.path.abspath(args.torch_out)}"
                                   if args.torch_out else ""))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  # orbax warns (through absl) about every item it is not asked to restore; errors still show.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return _run(args)
  finally:
    absl_logger.setLevel(level)


if __name__ == "__main__":
  sys.exit(main())
