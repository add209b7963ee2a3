"""dora-finetune: a linear probe or full fine-tuning of a trained backbone on labelled images.

  config_base  every config key, with what it does
  data         image sources (image folder, tfds) and the grain pipelines of the views
  model        features of the backbone, the linear head, the two optimisers (SGD, AdamW + LLRD)
  train        the loop (checks, mesh, jitted steps, restore, loop with validation)
  demo_data    the CPU demo's labelled crops of synthetic walking tours
"""
