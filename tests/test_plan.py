"""The run's plan: the config's model, DoRA and mesh sections parsed once (trainer/plan.py)."""
import dataclasses

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from dora_jax import objects
from dora_jax.models import dino
from dora_jax.models import vit
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import preflight
from dora_jax.trainer import sharding


def test_plan_holds_each_section_parsed(tiny_config):
  config = tiny_config(**{"mesh.fsdp": 2, "mesh.fsdp_min_size": 64, "dora.mask_threshold": "0.3"})
  plan = plan_lib.TrainPlan.from_config(config)
  assert plan.model.size == vit.ViTSize(dim=32, depth=2, num_heads=4, patch_size=8)
  assert plan.model.out_dim == config.model.out_dim and plan.model.remat == "none"
  assert plan.dora == objects.DoraOptions(num_objects=2, sinkhorn_iters=3, sinkhorn_epsilon=0.05,
                                          mask_mode="remove", mask_threshold=0.3)
  assert plan.masking is plan.dora
  assert plan.mesh == sharding.MeshPlan(data=-1, fsdp=2, fsdp_min_size=64)
  assert plan.mesh.shape(4) == (2, 2) and dict(plan.mesh.make().shape) == {"data": 2, "fsdp": 2}
  assert plan.image_size == 32
  # What the trainer's checks return is this plan.
  assert preflight.check_config(config) == plan


def test_dino_baseline_has_no_masking_but_tracks_in_its_pictures(tiny_config):
  plan = plan_lib.TrainPlan.from_config(tiny_config(**{"dora.enabled": False}))
  assert plan.masking is None and plan.dora.num_objects == 2


def test_unrolled_plan_only_where_blocks_are_scanned(tiny_config):
  scanned = plan_lib.TrainPlan.from_config(tiny_config(**{"model.depth": 3, "model.scan": True}))
  assert scanned.unrolled() == dataclasses.replace(
      scanned, model=dataclasses.replace(scanned.model, scan=False))
  # Two blocks are not scanned (block depth-1 is always outside the scan); scan off: nothing.
  assert plan_lib.TrainPlan.from_config(tiny_config(**{"model.scan": True})).unrolled() is None
  assert plan_lib.TrainPlan.from_config(
      tiny_config(**{"model.depth": 3, "model.scan": False})).unrolled() is None


@pytest.mark.parametrize("overrides,message", [
    ({"model.variant": "L/16", "model.dim": 0}, r"^config model: .*'L/16'"),
    ({"model.compute_dtype": "float16"}, r"^config model: .*compute_dtype is 'float16'"),
    ({"model.remat": "true"}, r"^config model: model.remat is 'true'"),
    ({"dora.num_objects": 5}, r"^config dora.num_objects=5: must be between 1 and the 4"),
])
def test_plan_errors_name_the_key(tiny_config, overrides, message):
  with pytest.raises(ValueError, match=message):
    plan_lib.TrainPlan.from_config(tiny_config(**overrides))


def test_model_options_build_the_model_the_config_describes(tiny_config):
  """The options' model equals a ViT built straight from the variant and the config's overrides
  (the same parameters from the same key)."""
  config = tiny_config(**{"model.drop_path_rate": 0.2})
  options = dino.ModelOptions.from_config(config.model)
  model = dino.build_model(options, img_size=32, rngs=nnx.Rngs(params=jax.random.PRNGKey(3)))
  reference = vit.VisionTransformer(
      config.model.variant, img_size=32, drop_path_rate=0.2,
      **dino.size_overrides(config.model), rngs=nnx.Rngs(params=jax.random.PRNGKey(3)))
  got, want = nnx.to_pure_dict(nnx.state(model.backbone)), nnx.to_pure_dict(nnx.state(reference))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert [b.drop_path_rate for b in model.backbone.blocks] == pytest.approx([0.0, 0.2])


def test_a_saved_config_without_newer_keys_still_parses():
  """Configs of older runs (read by load_backbone) lack model.remat/scan and mesh.fsdp_min_size."""
  model = ml_collections.ConfigDict(dict(
      variant="Ti/16", dim=0, depth=0, num_heads=0, patch_size=0, drop_path_rate=0.1,
      head_hidden_dim=64, head_bottleneck_dim=16, head_layers=3, out_dim=32,
      norm_last_layer=False, compute_dtype="float32"))
  options = dino.ModelOptions.from_config(model)
  assert (options.remat, options.scan) == ("none", False)
  assert options.size == vit.VARIANTS["Ti/16"]
  mesh = sharding.MeshPlan.from_config(ml_collections.ConfigDict({"data": 1, "fsdp": 4}))
  assert mesh.fsdp_min_size == sharding.FSDP_MIN_SIZE and mesh.shape(4) == (1, 4)


def test_plan_holds_the_evaluations_that_are_on(tiny_config):
  from dora_jax.evaluation import registry  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  config.evals.knn = registry.config("knn", every_steps=5, train="/a", val="/b", k=7)
  config.evals.seg_off = registry.config("seg", data="/c")  # every_steps 0: off.
  plan = plan_lib.TrainPlan.from_config(config)
  assert [(e.name, e.type, e.every_steps) for e in plan.evals] == [("knn", "knn", 5)]
  values = plan.evals[0].values
  assert (values["train"], values["val"], values["k"]) == ("/a", "/b", 7)
  assert set(values) == set(registry.module("knn").DEFAULTS)  # The module's defaults filled in.

  config.evals.knn.every_steps = -1
  with pytest.raises(ValueError, match=r"config\.evals\.knn\.every_steps"):
    plan_lib.TrainPlan.from_config(config)
