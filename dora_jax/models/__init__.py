"""Models (Flax NNX), one per module.

  vit          `VisionTransformer` (the backbone), `VARIANTS`, PyTorch weight import/export.
  head         `DINOHead`, the projection head, PyTorch weight import/export.
  dino         `DinoModel` (backbone + head: the student and the teacher), `ModelOptions`
               (`config.model` parsed once), `build_model`.
  layers       initialisers shared by both.
  torch_names  DINO's PyTorch weight names <-> our parameter paths.
"""
