"""DoRA (Discover and tRAck) in JAX/Flax.

Modules:
  tracking      the DoRA kernels (discover, refine, track, masks, sinkhorn); pure functions.
  models.vit    the ViT backbone (Flax NNX) and PyTorch weight import.
  models.head   the DINO projection head.
  losses        the DINO loss and its centre.
  train_step    the jitted DoRA/DINO update.
  data          video conversion, TFRecord shards and the grain input pipeline.
"""

__version__ = "0.1.0"
