"""dora-finetune: a linear probe or full fine-tuning of a trained backbone on labelled images.

  config_base  every config key, with what it does
  data         the views and grain pipelines over `dora_jax.data.images` sources
  model        features of the backbone, the linear head, the two optimisers (SGD, AdamW + LLRD)
  train        the loop (checks, mesh, jitted steps, restore, loop with validation)
  demo_data    the CPU demo's labelled crops of synthetic walking tours
"""
