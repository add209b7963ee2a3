"""The shared base config: every key the trainer reads, each with one line saying what it is.

The defaults are the paper's run (DoRA ViT-S/16 on WT-Venice; docs/DESIGN.md has the table).
Config files in `configs/` start from `get_base_config()` and change only what differs, parse
their `:ARG` with `parse_arg`, and shrink for CPU smoke runs with `shrink_for_cpu`.

The keys that dora-train and dora-finetune share (seed, run length, batch, mesh, checkpoint and
log cadence) are declared once, by `add_run_length_keys` and `add_mesh_and_cadence_keys`, which
dora_jax/finetune/config_base.py calls too; `trainer.preflight.check_run_keys` checks them for
both programs.
"""
import importlib.util
import os

import ml_collections


def add_run_length_keys(c: ml_collections.ConfigDict, *, batch_size: int
                        ) -> ml_collections.ConfigDict:
  """The seed and the run's length, shared by dora-train (examples: clips) and dora-finetune
  (examples: images); `batch_size` is the program's default."""
  c.seed = 0  # PRNG seed: parameters, the step's randomness (drop path, DoRA), the data order.
  c.epochs = 100  # Passes over the training examples; sets total_steps when that is 0.
  c.total_steps = 0  # Optimiser steps; 0 derives it from `epochs` and the number of examples.
  c.batch_size = batch_size  # Global batch in examples (summed over all hosts and devices).
  return c


def add_mesh_and_cadence_keys(c: ml_collections.ConfigDict, *, checkpoint_every_steps: int,
                              keep_checkpoints: int) -> ml_collections.ConfigDict:
  """The mesh and the checkpoint and log cadence, shared by dora-train and dora-finetune;
  the two numbers are the program's defaults."""
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data-parallel axis (-1: all devices).
  c.mesh.fsdp = 1  # Devices that shard parameters and optimizer state (FSDP axis).
  c.mesh.fsdp_min_size = 2**14  # Arrays with fewer elements stay replicated under FSDP.
  c.checkpoint_every_steps = checkpoint_every_steps  # Save every n steps, at the end, on SIGTERM.
  c.keep_checkpoints = keep_checkpoints  # Checkpoints kept on disk.
  c.log_every_steps = 50  # Metrics to TensorBoard, metrics.jsonl and the console.
  return c


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # ---- Seed and schedule length (a clip is one example). ----
  add_run_length_keys(c, batch_size=128)

  # ---- Model. ----
  c.model = ml_collections.ConfigDict()
  c.model.variant = "S/16"  # ViT variant: Ti/S/B with patch 16 or 8 (e.g. "S/16", "B/8").
  c.model.dim = 0  # Token width; 0 takes the variant's (set with depth/num_heads for tiny models).
  c.model.depth = 0  # Transformer blocks; 0 takes the variant's.
  c.model.num_heads = 0  # Attention heads; 0 takes the variant's.
  c.model.patch_size = 0  # Patch side in pixels; 0 takes the variant's.
  c.model.drop_path_rate = 0.1  # Stochastic depth in the student (the teacher uses none).
  c.model.head_hidden_dim = 2048  # Hidden width of the DINO head's MLP.
  c.model.head_bottleneck_dim = 256  # Width of the head's L2-normalised bottleneck.
  c.model.head_layers = 3  # Layers in the head's MLP.
  c.model.out_dim = 65536  # Prototypes in the head's weight-normalised last layer.
  c.model.norm_last_layer = False  # Fix the last layer's weight-norm gain at 1.
  c.model.compute_dtype = "float32"  # Matmul dtype: "float32" or "bfloat16" (params stay f32).
  c.model.remat = "dots"  # What backward recomputes per ViT block: none, dots or full (vit.REMAT_POLICIES).
  c.model.scan = True  # ViT blocks 0..depth-2 under one lax.scan: same numbers, faster compile.

  # ---- DoRA object discovery, tracking and masking (ignored when dora.enabled is False). ----
  c.dora = ml_collections.ConfigDict()
  c.dora.enabled = True  # False: DINO (loss over pairs of different views; configs/dino_*.py).
  c.dora.num_objects = 3  # k: attention heads picked at random, one object each.
  c.dora.sinkhorn_iters = 3  # Fixed Sinkhorn-Knopp iterations in `refine` (paper 3, ref code 30).
  c.dora.sinkhorn_epsilon = 0.05  # Entropic regularisation of the OT step.
  c.dora.mask_mode = "remove"  # "remove": drop a random non-empty object subset; "keep": one view per object.
  c.dora.mask_threshold = "mean"  # Heat-map cut: row mean ("mean"), public code's "batch_mean", a float.

  # ---- DINO loss. ----
  c.loss = ml_collections.ConfigDict()
  c.loss.student_temp = 0.1  # Student softmax temperature.
  c.loss.teacher_temp = 0.04  # Teacher temperature after warm-up.
  c.loss.warmup_teacher_temp = 0.04  # Teacher temperature at step 0.
  c.loss.warmup_teacher_temp_epochs = 30  # Epochs of linear teacher-temperature warm-up.
  c.loss.center_momentum = 0.9  # EMA momentum of the teacher-output centre.

  # ---- Optimiser. ----
  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 5e-4  # Peak learning rate per 256 clips (scaled by batch_size / 256).
  c.optim.min_lr = 1e-5  # Learning rate at the end of the cosine decay.
  c.optim.warmup_epochs = 10  # Epochs of linear learning-rate warm-up.
  c.optim.weight_decay = 0.04  # AdamW weight decay at step 0 (weight matrices and tokens only).
  c.optim.weight_decay_end = 0.4  # Weight decay at the end (cosine schedule).
  c.optim.clip_grad_norm = 3.0  # Gradient-norm clip of each parameter tensor separately; 0: off.
  c.optim.freeze_last_layer_epochs = 1  # Epochs with the head's last layer frozen.
  c.optim.teacher_momentum = 0.996  # Teacher EMA momentum at step 0 (cosine to 1).

  # ---- Data. ----
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # Folder of shards + manifest.json written by `dora-convert`.
  c.data.synthetic = False  # Train on the synthetic walking tour made in WORKDIR/demo_data (ignores dir).
  c.data.video_ids = ()  # Videos to train on (manifest ids); empty uses all of them.
  c.data.num_videos = 0  # Keep only the first n of those videos (manifest order); 0: all.
  c.data.frames_per_clip = 8  # T: frames per clip (frame 0 is the anchor).
  c.data.frame_stride = 60  # Distance between a clip's frames, in stored frames.
  c.data.global_pre_size = 300  # Side of the first, clip-level random-resized crop; 0: none (DINO).
  c.data.global_pre_scale = (0.2, 1.0)  # Area range of that crop.
  c.data.global_size = 224  # Side of the global views.
  c.data.global_scale = (0.4, 1.0)  # Area range of the global crop from the pre-crop.
  c.data.global_crops_per_frame = 1  # 1: one crop per clip (DoRA); 2: two per frame (DINO).
  c.data.num_local_crops = 6  # M: local crops per frame (0 disables them).
  c.data.local_size = 112  # Side of the local crops.
  c.data.local_scale = (0.05, 0.4)  # Area range of the local crops within the pre-crop.
  c.data.flip_prob = 0.5  # Horizontal flip of the global view: per clip (DoRA), per crop (DINO).
  c.data.local_flip_prob = 0.0  # Horizontal flip of each local crop (public DoRA code: 0, DINO: 0.5).
  c.data.color_jitter_prob = 0.8  # Probability of colour jitter, per frame.
  c.data.brightness = 0.4  # Colour jitter: brightness strength.
  c.data.contrast = 0.4  # Colour jitter: contrast strength.
  c.data.saturation = 0.2  # Colour jitter: saturation strength.
  c.data.hue = 0.1  # Colour jitter: hue strength.
  c.data.grayscale_prob = 0.2  # Probability of grayscale, per frame.
  c.data.global_blur_prob = 0.1  # Gaussian blur probability on the (first) global view.
  c.data.second_global_blur_prob = 0.1  # Gaussian blur probability on DINO's second global crop.
  c.data.second_global_solarize_prob = 0.2  # Solarization probability on DINO's second global crop.
  c.data.local_blur_prob = 0.5  # Gaussian blur probability on local crops.
  c.data.blur_sigma = (0.1, 2.0)  # Gaussian blur sigma range.
  c.data.num_workers = 8  # grain worker processes per host (0: in the main process).
  c.data.prefetch_buffer_size = 2  # Batches each worker prepares ahead.
  c.data.num_threads = 2  # Threads per data process (main or worker) making clips in parallel.

  # ---- Evaluations during pretraining: the registry of dora_jax/evaluation/registry.py. ----
  # evals.NAME = an evaluator: `type` (knn, seg, davis, discover, track; NAME when absent),
  # `every_steps` (0: off; on: also the last step) and its settings, named as `dora-eval TYPE`'s
  # flags (their defaults in its module); logged as NAME/KEY. configs/ add them with
  # `registry.config(TYPE, ...)`, which holds every key so --config.evals.NAME.KEY can set any.
  c.evals = ml_collections.ConfigDict()  # None by default.

  # ---- Mesh, checkpoints, logging, pictures. ----
  add_mesh_and_cadence_keys(c, checkpoint_every_steps=1000, keep_checkpoints=3)
  c.picture_every_steps = 1000  # Write a PNG of one clip's tracked objects (0: never).
  c.compilation_cache_dir = ""  # Compiled-step cache: "" $JAX_COMPILATION_CACHE_DIR or WORKDIR/jax_cache, "none" off, or a folder.
  return c


def replaced_key(dotted: str) -> str | None:
  """The key that replaced a removed one (`eval.knn_train` -> `evals.knn.train`), else None."""
  if dotted != "eval" and not dotted.startswith("eval."):
    return None
  key = dotted[len("eval."):]
  for type_name in ("knn", "track", "seg"):
    if key.startswith(type_name + "_"):
      return f"evals.{type_name}.{key[len(type_name) + 1:]}"
  return "evals.NAME" + (f".{key}" if key else "")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of a config file given as 'configs/x.py[:ARG]' (config_flags' form).

  Raises:
    ValueError: the file does not exist or has no get_config (one line).
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist (expected configs/NAME.py[:ARG]).")
  module_spec = importlib.util.spec_from_file_location("dora_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config(arg).")
  return module.get_config(arg or None)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'variant=B/16,data=/x,runlocal' -> ConfigDict over `defaults`, values typed like them.

  A bare name sets a boolean default to True. An unknown name is an error that lists the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    name, has_value, value = part.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r} in {arg!r}; known: {sorted(defaults)}.")
    default = defaults[name]
    if isinstance(default, bool):
      if has_value and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {name}={value!r}: expected true or false.")
      result[name] = (not has_value) or value.lower() in ("true", "1")
    elif not has_value:
      raise ValueError(f"config argument {name!r} needs a value: {name}=...")
    else:
      result[name] = type(default)(value)
  return result


def apply_wtours_args(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """The arguments of the Walking Tours configs (variant=, data=, videos=, runlocal) applied to c."""
  args = parse_arg(arg, variant="S/16", data="", videos="", runlocal=False)
  c.model.variant = args.variant
  c.data.dir = args.data
  if args.videos.isdigit():
    c.data.num_videos = int(args.videos)
  else:
    c.data.video_ids = tuple(v for v in args.videos.split("+") if v)
  if args.runlocal:
    shrink_for_cpu(c)
    c.data.frames_per_clip = 2
    c.data.frame_stride = 10
    c.batch_size = 4
    c.total_steps = 4
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.picture_every_steps = 2
  return c


def dino_baseline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The DINO baseline of a DoRA config: frames as images, two global crops of the whole frame
  (DINO's DataAugmentationDINO: blur 1.0 on the first, blur 0.1 and solarisation 0.2 on the
  second), flipped local crops, the loss over pairs of different views; all else unchanged."""
  c.dora.enabled = False
  c.data.frames_per_clip = 1  # Frames as images.
  c.data.frame_stride = 1
  c.data.global_pre_size = 0  # Crops of the whole frame.
  c.data.global_crops_per_frame = 2
  c.data.global_blur_prob = 1.0
  c.data.second_global_blur_prob = 0.1
  c.data.second_global_solarize_prob = 0.2
  c.data.local_flip_prob = 0.5
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict, *, image_size: int = 64, width: int = 64,
                   depth: int = 4, num_heads: int = 4) -> ml_collections.ConfigDict:
  """Tiny shapes for CPU smoke runs, the demo and the tests; the recipe otherwise unchanged.

  A ViT of `width` x `depth` with 8-px patches on `image_size`-px frames (local crops half that),
  a head 4x as wide, the synthetic walking tour, 2 objects, 2 local crops, batch 8, no drop path,
  data made in the main process.
  """
  c.model.dim = width
  c.model.depth = depth
  c.model.num_heads = num_heads
  c.model.patch_size = 8
  c.model.drop_path_rate = 0.0
  c.model.head_hidden_dim = 4 * width
  c.model.head_bottleneck_dim = width
  c.model.out_dim = 4 * width
  c.model.remat = "none"  # Too few blocks to scan; unrolled blocks gain nothing from "dots".
  c.dora.num_objects = min(2, num_heads)
  c.data.synthetic = True
  c.data.global_pre_size = image_size * 3 // 2
  c.data.global_size = image_size
  c.data.num_local_crops = 2
  c.data.local_size = image_size // 2
  c.data.num_workers = 0
  c.batch_size = 8
  return c
