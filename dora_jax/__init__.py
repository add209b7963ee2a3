"""DoRA (Discover and tRAck) in JAX/Flax.

The packages are the layers, bottom up (docs/DESIGN.md section 2; tests/test_layers.py):
  tracking, losses, config_base, paths   the method and its contract: the DoRA kernels
                                         (discover, refine, track, masks, sinkhorn), the DINO
                                         loss, every config key, local and cloud paths.
  models/, data/                         the ViT and the DINO head; videos -> shards -> clips
                                         (never imports jax).
  objects                                DoRA's object-aware views from a teacher's outputs.
  evaluation/                            k-NN, DAVIS, tracking IoU, ... of a backbone.
  trainer/                               the train step, checks, checkpoints, the loop.
  pretrained/                            weight I/O: load_backbone, exported folders, .pth.
  finetune/                              linear probe and fine-tuning on labelled images.
  cli/                                   one module per console script.
"""

__version__ = "0.1.0"
