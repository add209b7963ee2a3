"""The run behind `dora-finetune`: a linear probe or full fine-tuning of a trained backbone.

Read top to bottom, `train_and_evaluate` does:
  1. checks the config, the work folder, the images and the backbone (one-line `checks.ConfigError`s,
     before anything is written or compiled);
  2. builds the ('data', 'fsdp') mesh, the state's shapes (`jax.eval_shape`) and its shardings;
  3. jits the train step (state donated) and the validation step;
  4. restores the latest checkpoint of the work folder (state + data position) or initialises
     the state from the backbone (pretrained or random) and a fresh head;
  5. runs the loop dora-train shares (`trainer.loop.run`: step timer, metrics, checkpoints,
     SIGTERM saves and returns, a non-finite loss stops the run), with the validation accuracy
     every `eval_every_epochs` and at the last step as its evaluation.
Then `WORKDIR/results.json` holds the final and best validation accuracy. `run` adds, when
`compare_random_init` is set, the same recipe from a randomly initialised backbone.

The train state (one pytree, saved whole by orbax):
  step       int32 scalar, updates done
  backbone   nnx.State of the ViT's parameters (frozen in the linear probe)
  head       {"kernel" (F, C), "bias" (C,)}
  opt_state  the optimiser's state of the trained part (the head, or backbone and head)
  rng        PRNG key of drop path (folded with the step)
"""
from __future__ import annotations

import json
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dora_jax.finetune import checks
from dora_jax.finetune import data as data_lib
from dora_jax.finetune import model as model_lib
from dora_jax.models import dino
from dora_jax.models import vit
from dora_jax import checkpoint
from dora_jax import paths
from dora_jax import pretrained
from dora_jax.pretrained import export
from dora_jax.trainer import flops as flops_lib
from dora_jax.trainer import loop
from dora_jax.trainer import metrics as metrics_lib
from dora_jax.trainer import sharding as sharding_lib

RESULTS_FILE = "results.json"
COMPARISON_FILE = "comparison.json"
RANDOM_INIT_DIR = "random_init"


def load_initial_backbone(config: ml_collections.ConfigDict, recipe: model_lib.Recipe
                          ) -> tuple[nnx.GraphDef, nnx.State, vit.ViTSize]:
  """(graphdef, parameters, size) of the backbone to start from: backbone.path's weights, or the
  same ViT freshly initialised from the seed (backbone.init="random"), with the recipe's drop
  path."""
  try:
    loaded = pretrained.load_backbone(config.backbone.path)
  except (FileNotFoundError, checkpoint.CheckpointMismatchError, export.ExportError) as e:
    raise checks.ConfigError(f"config backbone.path: {e}") from None
  dtype = dino.compute_dtype(config.backbone.compute_dtype)
  backbone = model_lib.with_drop_path(loaded, recipe.drop_path_rate, dtype)
  graphdef, params = nnx.split(backbone)
  size = loaded.size
  if config.backbone.init == "random":

    def fresh(rng):
      return nnx.split(vit.VisionTransformer(
          None, dim=size.dim, depth=size.depth, num_heads=size.num_heads,
          patch_size=size.patch_size, img_size=loaded.img_size, dtype=dtype,
          drop_path_rate=recipe.drop_path_rate, rngs=nnx.Rngs(params=rng)))[1]

    params = jax.jit(fresh)(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
  return graphdef, params, size


def make_recipe(config: ml_collections.ConfigDict, *, num_classes: int, steps_per_epoch: int,
                total_steps: int) -> model_lib.Recipe:
  linear = config.mode == "linear"
  return model_lib.Recipe(
      mode=config.mode,
      num_classes=num_classes,
      num_last_blocks=int(config.linear.num_last_blocks) if linear else 1,
      avgpool=bool(config.linear.avgpool) and linear,
      peak_lr=float(config.optim.base_lr) * config.batch_size / 256.0,
      min_lr=float(config.optim.min_lr),
      warmup_steps=min(int(round(config.optim.warmup_epochs * steps_per_epoch)), total_steps),
      total_steps=int(total_steps),
      momentum=float(config.optim.momentum),
      weight_decay=float(config.optim.weight_decay),
      layer_decay=float(config.full.layer_decay),
      label_smoothing=0.0 if linear else float(config.full.label_smoothing),
      drop_path_rate=0.0 if linear else float(config.full.drop_path_rate),
  )


# ---- 2-3. State, steps. ----


def _trainable(recipe: model_lib.Recipe, state: dict[str, Any]) -> Any:
  if recipe.mode == "linear":
    return state["head"]
  return {"backbone": state["backbone"], "head": state["head"]}


def init_state(recipe: model_lib.Recipe, optimizer: optax.GradientTransformation,
               feature_size: int, backbone_params: nnx.State, rng: jax.Array) -> dict[str, Any]:
  head_rng, step_rng = jax.random.split(rng)
  state = {"step": jnp.zeros((), jnp.int32), "backbone": backbone_params,
           "head": model_lib.init_head(head_rng, feature_size, recipe.num_classes),
           "rng": step_rng}
  state["opt_state"] = optimizer.init(_trainable(recipe, state))
  return state


def make_train_step(recipe: model_lib.Recipe, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation):
  """`step(state, batch) -> (state, metrics)`; batch {"image" uint8 (B, S, S, 3), "label" (B,)};
  metrics `loss`, `accuracy`, `lr` and `finite` (`loop.with_finite_check` of the trained part)."""
  schedule = model_lib.learning_rate(recipe)

  def step(state, batch):
    images = vit.normalize_images(batch["image"])
    labels = batch["label"]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, recipe.num_classes),
                                  recipe.label_smoothing)
    drop_path_rng = jax.random.fold_in(state["rng"], state["step"])

    if recipe.mode == "linear":  # The frozen backbone runs once, outside the gradient.
      frozen = jax.lax.stop_gradient(model_lib.features(
          nnx.merge(graphdef, state["backbone"]), images, recipe))

    def loss_fn(trainable):
      if recipe.mode == "linear":
        logits = model_lib.apply_head(trainable, frozen)
      else:
        backbone = nnx.merge(graphdef, trainable["backbone"])
        logits = model_lib.apply_head(trainable["head"], model_lib.features(
            backbone, images, recipe, drop_path_rng=drop_path_rng))
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    trainable = _trainable(recipe, state)
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = dict(state, step=state["step"] + 1, opt_state=opt_state)
    if recipe.mode == "linear":
      new_state["head"] = trainable
    else:
      new_state.update(trainable)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": schedule(state["step"])}
    return new_state, metrics

  return loop.with_finite_check(step, trained=lambda state: _trainable(recipe, state))


def make_eval_step(recipe: model_lib.Recipe, graphdef: nnx.GraphDef):
  """`step(state, batch) -> sums` over a batch {"image", "label", "valid"} (padding has valid 0)."""
  top_k = min(5, recipe.num_classes)

  def step(state, batch):
    backbone = nnx.merge(graphdef, state["backbone"])
    logits = model_lib.apply_head(state["head"], model_lib.features(
        backbone, vit.normalize_images(batch["image"]), recipe))
    labels, valid = batch["label"], batch["valid"].astype(jnp.float32)
    correct = jnp.argmax(logits, -1) == labels
    in_top_k = jnp.any(jax.lax.top_k(logits, top_k)[1] == labels[:, None], axis=-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"correct": jnp.sum(correct * valid), "correct_top5": jnp.sum(in_top_k * valid),
            "loss": jnp.sum(loss * valid), "count": jnp.sum(valid)}

  return step


# ---- 5. Helpers of the loop. ----


def validate(evaluate, state, sources_val, view_config, config, batch_sharding,
             num_classes: int) -> dict[str, float]:
  """Validation metrics of `state` over the whole validation source."""
  totals = None
  for batch in data_lib.eval_batches(
      sources_val, view_config, global_batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads):
    sums = evaluate(state, sharding_lib.global_batch(batch, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = {name: float(value) for name, value in jax.device_get(totals).items()}
  count = max(totals["count"], 1.0)
  result = {"val_accuracy": totals["correct"] / count, "val_loss": totals["loss"] / count}
  if num_classes > 5:
    result["val_top5"] = totals["correct_top5"] / count
  return result


def summarize(workdir: str, config: ml_collections.ConfigDict, specs: dict[str, str],
              total_steps: int) -> dict[str, Any]:
  """The run's results from its metrics.jsonl (so that a resumed run reports the whole run)."""
  rows = [row for row in metrics_lib.read_metrics(workdir) if "val_accuracy" in row]
  return {
      "mode": config.mode,
      "init": config.backbone.init,
      "backbone": paths.absolute(config.backbone.path),
      "data": dict(specs),
      "steps": rows[-1]["step"] if rows else 0,
      "total_steps": total_steps,
      "val_accuracy": rows[-1]["val_accuracy"] if rows else None,
      "best_val_accuracy": max((row["val_accuracy"] for row in rows), default=None),
  }


def write_json(path: str, value: Any) -> None:
  """`value` as indented JSON at `path` (local or URL), written whole."""
  paths.write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


# ---- The run. ----


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the fine-tuning of `config` in `workdir`; returns its results.

  Raises:
    checks.ConfigError: bad input, found before anything is written or compiled.
    checkpoint.CheckpointMismatchError: the work folder holds a checkpoint of another model.
    loop.NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    checkpoint.WorkdirLockedError: another live run uses `workdir`.
    checkpoint.CheckpointDamagedError: it holds checkpoints, but none is intact.
    checkpoint.CheckpointSaveError: a save failed (e.g. a full disk); older checkpoints stay.
  """
  workdir = paths.absolute(workdir)
  # 1. Checks; then the work folder is ours (one run per folder, as dora-train).
  checks.check_config(config)
  checks.check_workdir(workdir)
  with checkpoint.run_lock(workdir, command="dora-finetune"):
    return _train_locked(config, workdir)


def _train_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  data = checks.prepare_data(config, workdir)
  num_classes = len(data["train"].class_names)
  steps_per_epoch = len(data["train"]) // config.batch_size
  total_steps = int(config.total_steps or round(config.epochs * steps_per_epoch))
  eval_every = config.eval_every_epochs * steps_per_epoch
  recipe = make_recipe(config, num_classes=num_classes, steps_per_epoch=steps_per_epoch,
                       total_steps=total_steps)
  graphdef, backbone_params, size = load_initial_backbone(config, recipe)

  # 2. Mesh, state shapes and shardings.
  mesh_plan = sharding_lib.MeshPlan.from_config(config.mesh)
  mesh = mesh_plan.make()
  optimizer = model_lib.make_optimizer(recipe, size.depth)
  init = lambda params, rng: init_state(
      recipe, optimizer, model_lib.feature_dim(size.dim, recipe), params, rng)
  abstract_state = jax.eval_shape(init, backbone_params, jax.random.PRNGKey(config.seed))
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh, mesh_plan.fsdp_min_size)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  logging.info("Mesh %s; %s on %d classes, %d training / %d validation images; %d steps (%d per "
               "epoch), global batch %d.", dict(mesh.shape), config.mode, num_classes,
               len(data["train"]), len(data["val"]), total_steps, steps_per_epoch,
               config.batch_size)

  # 3. The jitted steps.
  update = jax.jit(make_train_step(recipe, graphdef, optimizer),
                   in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
  evaluate = jax.jit(make_eval_step(recipe, graphdef),
                     in_shardings=(state_sharding, batch_sharding), out_shardings=replicated)

  # 4. Restore or initialise.
  checkpointer = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                         keep=config.keep_checkpoints)
  state, data_state, start_step = loop.restore_or_init(
      checkpointer, abstract_state, state_sharding,
      lambda: jax.jit(init, out_shardings=state_sharding)(
          jax.device_put(backbone_params, state_sharding["backbone"]),
          jax.random.PRNGKey(config.seed)))
  del backbone_params
  view_config = data_lib.ViewConfig.from_config(config.data)
  data_iter = data_lib.train_iterator(
      data["train"], view_config, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers, num_threads=config.data.num_threads)
  if data_state is not None:
    data_iter.set_state(data_state)
  if jax.process_index() == 0:
    checkpoint.write_config(workdir, config, file=checkpoint.FINETUNE_CONFIG_FILE)

  # 5. The loop (trainer/loop.py), with validation every `eval_every_epochs` and at the end.
  def eval_due(step: int) -> bool:
    return step % eval_every == 0 or step == total_steps

  def validation(step: int, state: Any) -> dict[str, float]:
    return {"epoch": step / steps_per_epoch, **validate(
        evaluate, state, data["val"], view_config, config, batch_sharding, num_classes)}

  job = loop.Job(
      workdir=workdir, total_steps=total_steps, log_every_steps=config.log_every_steps,
      update=update, step_inputs=lambda state, batch, step: (state, batch),
      batch_sharding=batch_sharding, items_per_step=config.batch_size,
      throughput_name="images_per_second",
      checkpoint_due=lambda step: eval_due(step) or bool(
          config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0),
      evaluation_due=eval_due, evaluate=validation,
      peak_flops=flops_lib.device_peak(config.backbone.compute_dtype))
  loop.run(job, state=state, start_step=start_step, data_iter=data_iter,
           checkpointer=checkpointer)
  results = summarize(workdir, config, data["specs"], total_steps)
  if jax.process_index() == 0 and results["steps"] == total_steps:
    write_json(paths.join(workdir, RESULTS_FILE), results)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate`, then (with compare_random_init) the same recipe from a random backbone
  in WORKDIR/random_init, on the same images; both results go to WORKDIR/comparison.json."""
  results = train_and_evaluate(config, workdir)
  if not config.compare_random_init or results["steps"] < results["total_steps"]:
    return results
  baseline_config = ml_collections.ConfigDict(config.to_dict())
  baseline_config.backbone.init = "random"
  baseline_config.compare_random_init = False
  baseline_config.data.demo = False
  baseline_config.data.train, baseline_config.data.val = (results["data"]["train"],
                                                          results["data"]["val"])
  baseline = train_and_evaluate(baseline_config, paths.join(workdir, RANDOM_INIT_DIR))
  comparison = {config.backbone.init: results, "random": baseline}
  if jax.process_index() == 0 and baseline["steps"] == baseline["total_steps"]:
    write_json(paths.join(paths.absolute(workdir), COMPARISON_FILE), comparison)
  return comparison
