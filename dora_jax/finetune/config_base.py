"""The base config of dora-finetune: every key the fine-tuning loop reads, each with a comment.

The defaults are DINO's linear evaluation of a ViT-S (eval_linear.py); configs/finetune_*.py
start from here. The keys it shares with dora-train (seed, run length, batch, mesh, checkpoint
and log cadence) are declared in dora_jax/config_base.py.
"""
import ml_collections

from dora_jax import config_base


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # ---- Seed and schedule length (an image is one example; DINO's batch: 128 per GPU x 8). ----
  config_base.add_run_length_keys(c, batch_size=1024)  # batch_size also for validation.
  c.mode = "linear"  # "linear": frozen backbone, linear classifier; "full": fine-tune everything.

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

  # ---- Mesh, checkpoints (0: only at validations and the end), logging, validation. ----
  config_base.add_mesh_and_cadence_keys(c, checkpoint_every_steps=0, keep_checkpoints=2)
  c.eval_every_epochs = 1  # Validation accuracy every n epochs (and after the last step).
  c.compare_random_init = False  # Then train the same recipe from a random backbone; report both.
  return c
