"""The base config of dora-finetune: every key the fine-tuning loop reads, each with a comment.

The defaults are DINO's linear evaluation of a ViT-S (eval_linear.py); configs/finetune_*.py
start from here.
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed for the head (and a random backbone), drop path and the data order.
  c.mode = "linear"  # "linear": frozen backbone, linear classifier; "full": fine-tune everything.

  # ---- Schedule length. ----
  c.epochs = 100  # Passes over the training images; sets total_steps when that is 0.
  c.total_steps = 0  # Optimiser steps; 0 derives it from `epochs` and the number of images.
  c.batch_size = 1024  # Global batch in images (DINO: 128 per GPU x 8), also for validation.

  # ---- The backbone. ----
  c.backbone = ml_collections.ConfigDict()
  c.backbone.path = ""  # A dora-train work folder, one of its checkpoints/STEP, or a dora-export folder.
  c.backbone.init = "pretrained"  # "pretrained": its weights; "random": the same ViT freshly initialised.
  c.backbone.compute_dtype = "float32"  # Matmul dtype: "float32" or "bfloat16" (params stay f32).

  # ---- Linear probe (mode "linear"). ----
  c.linear = ml_collections.ConfigDict()
  c.linear.num_last_blocks = 4  # n: [CLS] of the last n blocks, concatenated (DINO: 4 ViT-S, 1 ViT-B).
  c.linear.avgpool = False  # Also the mean patch token of the last block (DINO: False ViT-S, True ViT-B).

  # ---- Fine-tuning (mode "full"). ----
  c.full = ml_collections.ConfigDict()
  c.full.drop_path_rate = 0.1  # Stochastic depth of the last block (block i: rate * i / (depth - 1)).
  c.full.layer_decay = 0.75  # Layer-wise lr decay: layer l of L = depth + 1 gets decay ** (L - l).
  c.full.label_smoothing = 0.1  # Cross-entropy label smoothing.

  # ---- Optimiser (SGD with momentum for "linear", AdamW for "full"). ----
  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 0.001  # Peak learning rate per 256 images (scaled by batch_size / 256).
  c.optim.min_lr = 0.0  # Learning rate at the end of the cosine decay.
  c.optim.warmup_epochs = 0.0  # Epochs of linear warm-up from 0 (fractions allowed).
  c.optim.momentum = 0.9  # SGD momentum (mode "linear").
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay on weight matrices (mode "full").

  # ---- Data. ----
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # Training images: an image folder (ROOT/CLASS/IMAGE) or tfds:NAME:SPLIT.
  c.data.val = ""  # Validation images, the same forms and classes.
  c.data.tfds_data_dir = ""  # data_dir of tfds sources ("": tfds's default).
  c.data.demo = False  # Make the demo's labelled crops in WORKDIR/demo_images (ignores train, val).
  c.data.image_size = 224  # Side of the training crops and of the validation views.
  c.data.crop_scale = (0.08, 1.0)  # Area range of the training random-resized crop.
  c.data.flip_prob = 0.5  # Horizontal flip of training crops.
  c.data.val_crop_fraction = 0.875  # Validation: short side to image_size / this (256), centre crop.
  c.data.num_workers = 4  # grain worker processes per host for training images (0: main process).
  c.data.num_threads = 4  # Threads per data process reading and cropping images.

  # ---- Mesh and parallelism. ----
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data-parallel axis (-1: all devices).
  c.mesh.fsdp = 1  # Devices that shard parameters and optimizer state (FSDP axis).
  c.mesh.fsdp_min_size = 2**14  # Arrays with fewer elements stay replicated under FSDP.

  # ---- Validation, checkpoints, logging. ----
  c.eval_every_epochs = 1  # Validation accuracy every n epochs (and after the last step).
  c.checkpoint_every_steps = 0  # Also save every n steps (0: at validations and the end only).
  c.keep_checkpoints = 2  # Checkpoints kept on disk.
  c.log_every_steps = 50  # Training loss, accuracy and lr to TensorBoard, metrics.jsonl, console.
  c.compare_random_init = False  # Then train the same recipe from a random backbone; report both.
  return c
