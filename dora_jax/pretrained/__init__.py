"""Weight I/O: the trained encoder in and out of the project.

  backbone          `load_backbone`: the teacher ViT of a `dora-train` run or an exported folder.
  export            exported backbone folders (orbax parameters + a JSON description).
  torch_checkpoint  safe reading of PyTorch `.pth` files (DINO/DoRA releases).
"""
from dora_jax.pretrained.backbone import load_backbone

__all__ = ["load_backbone"]
