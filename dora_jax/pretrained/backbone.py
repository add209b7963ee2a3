"""The trained encoder: `load_backbone` returns the teacher ViT of a `dora-train` run.

A run's teacher (the EMA of the student) is the encoder DINO and DoRA evaluate and release. This
module only reads: the run folder's config.json describes the model (`models.dino`), and
`checkpoint.read_state` reads the teacher's arrays of one checkpoint, once, verified.
"""
import jax

from dora_jax import checkpoint
from dora_jax.models import dino
from dora_jax.pretrained import export


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
    checkpoint.CheckpointMismatchError: the checkpoint does not fit the run's config.
    export.ExportError: an exported folder whose description or parameters are broken.
    checkpoint.CheckpointDamagedError: the checkpoint's teacher is damaged (a file missing or
      unreadable, an array differing from its checksum); never NaN features.
  """
  if export.is_exported(path):
    return export.load_exported(path)
  workdir, checkpoint_dir, step = checkpoint.resolve_run(path)
  config = checkpoint.read_config(workdir)
  graphdef, abstract_teacher, constants = dino.abstract_model(
      dino.ModelOptions.from_config(config.model), img_size=config.data.global_size)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_teacher = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_teacher)
  try:
    _, teacher = checkpoint.read_state(checkpoint_dir, step, abstract_teacher, part="teacher")
  except checkpoint.CheckpointMismatchError as e:
    raise checkpoint.CheckpointMismatchError(
        f"{e}; {workdir}/{checkpoint.CONFIG_FILE} describes another model.") from None
  return dino.backbone_of(graphdef, teacher, constants)
