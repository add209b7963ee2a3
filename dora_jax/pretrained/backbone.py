"""The trained encoder: `load_backbone` returns the teacher ViT of a `dora-train` run.

A run's teacher (the EMA of the student) is the encoder DINO and DoRA evaluate and release. This
module only reads: it restores the teacher's parameters from an orbax checkpoint written by
`checkpoints.Checkpointer`, for the model the run's config.json describes.
"""
import os

import jax
import orbax.checkpoint as ocp

from dora_jax import paths
from dora_jax.pretrained import export
from dora_jax.trainer import checkpoint_items
from dora_jax.trainer import checkpoints
from dora_jax.trainer import plan as train_plan
from dora_jax.trainer import step as train_step


def _resolve_run(path: str) -> tuple[str, str, int | None]:
  """(workdir, checkpoint dir, step or None for the latest) of a work folder or a step folder."""
  path = paths.absolute(os.fspath(path)).rstrip("/")
  if paths.exists(paths.join(path, checkpoints.CONFIG_FILE)):
    return path, paths.join(path, checkpoints.CHECKPOINT_DIR), None
  parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
  grandparent = parent.rsplit("/", 1)[0] if "/" in parent else ""
  if (name.isdigit() and parent.rsplit("/", 1)[-1] == checkpoints.CHECKPOINT_DIR
      and paths.exists(paths.join(grandparent, checkpoints.CONFIG_FILE))):
    return grandparent, parent, int(name)
  raise FileNotFoundError(
      f"{path} is not a dora-train work folder (no {checkpoints.CONFIG_FILE}) nor one of its "
      f"{checkpoints.CHECKPOINT_DIR}/STEP folders: pass the --workdir of a training run.")


def load_backbone(path: str):
  """The teacher's ViT backbone of a training run, with its trained weights.

  The teacher (the EMA of the student) is the encoder DINO and DoRA evaluate and release.

  Args:
    path: a `dora-train` work folder (its latest checkpoint is used), one of its
      `checkpoints/STEP` folders, or a folder written by `dora-export`.

  Returns:
    A `dora_jax.models.vit.VisionTransformer`: called on float32 normalised images (B, H, W, 3),
    H and W divisible by its patch size, it returns the dict of the public contract (`cls`,
    `tokens`, `attn`, `q`, `k`).

  Raises:
    FileNotFoundError: `path` is not a work folder or has no checkpoint; nothing falls back to
      other weights.
    checkpoints.CheckpointMismatchError: the checkpoint does not fit the run's config.
    export.ExportError: an exported folder whose description or parameters are broken.
    checkpoints.CheckpointDamagedError: the checkpoint's teacher is damaged (a file missing or
      unreadable, an array differing from its checksum); never NaN features.
  """
  if export.is_exported(path):
    return export.load_exported(path)
  workdir, checkpoint_dir, step = _resolve_run(path)
  config = checkpoints.read_config(workdir)
  manager = checkpoints.open_read_only(checkpoint_dir)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"{checkpoint_dir} holds no finished checkpoint"
                            + (f" for step {step}" if step is not None else "") + ".")
  checkpoints.verify_step(checkpoint_dir, step, "teacher")
  graphdef, abstract_state = train_step.abstract_train_state(
      config, train_plan.TrainPlan.from_config(config))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_teacher = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      abstract_state["teacher"])
  saved = checkpoint_items.flat_shapes(manager.item_metadata(step)["state"].tree["teacher"])
  problem = checkpoint_items.describe_mismatch(saved, checkpoint_items.flat_shapes(abstract_teacher))
  if problem:
    raise checkpoints.CheckpointMismatchError(
        f"the teacher in {checkpoint_dir}/{step} does not match {workdir}/{checkpoints.CONFIG_FILE}: {problem}.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"teacher": abstract_teacher},
      restore_args=ocp.checkpoint_utils.construct_restore_args({"teacher": abstract_teacher}),
      partial_restore=True)))
  manager.close()
  state = dict(abstract_state, teacher=restored["state"]["teacher"])
  return train_step.teacher_backbone(graphdef, state)
