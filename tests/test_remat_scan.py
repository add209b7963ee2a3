"""model.remat and model.scan: the same outputs and gradients as the plain model, drop path on,
and the same parameters (paths, shapes, PyTorch names) so checkpoints and imports do not change."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax import config_base
from dora_jax.models import dino
from dora_jax.models import vit
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import preflight
from dora_jax.trainer import schedules
from dora_jax.trainer import step as train_step


def _model(**options):
  config = config_base.get_base_config().model
  config.update(dict(dim=32, depth=4, num_heads=4, patch_size=8, out_dim=24, head_hidden_dim=32,
                     head_bottleneck_dim=16, drop_path_rate=0.3, remat="none", scan=False)
                | options)  # The plain model unless told (the base config scans the blocks).
  return dino.build_model(dino.ModelOptions.from_config(config), img_size=32, rngs=nnx.Rngs(0))


def _run(model):
  """(jaxpr text, outputs, gradients) of a loss of every output, drop path on (the recomputed
  or scanned blocks must draw the same masks)."""
  images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits, out = nnx.merge(graphdef, params)(images, drop_path_rng=jax.random.PRNGKey(1))
    return (jnp.sum(jnp.sin(logits)) + jnp.sum(out["attn"] ** 2) + jnp.sum(out["q"] * out["k"])
            + jnp.sum(out["tokens"] ** 2), (logits, out))

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (_, outputs), grads = jax.jit(grad_fn)(params)
  return str(jax.make_jaxpr(grad_fn)(params)), outputs, nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def plain():
  return _run(_model())


@pytest.mark.parametrize("options, primitive", [
    (dict(remat="full"), "remat"),  # jax.checkpoint's primitive.
    (dict(remat="dots"), "remat"),
    (dict(scan=True), "scan"),
    (dict(remat="full", scan=True), "scan"),
    (dict(remat="dots", scan=True), "scan"),
])
def test_same_outputs_and_gradients(plain, options, primitive):
  plain_jaxpr, plain_outputs, plain_grads = plain
  jaxpr, outputs, grads = _run(_model(**options))
  assert primitive in jaxpr and primitive not in plain_jaxpr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               outputs, plain_outputs)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(plain_grads))
  # Float32 rounding of another summation order, relative to each gradient's scale; a wrong drop
  # path mask or keep factor would be off by O(1).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * np.abs(b).max()),
               grads, plain_grads)


def test_scan_keeps_the_parameters_and_their_names():
  plain, scanned = _model(), _model(scan=True)
  assert scanned.backbone.scan and not plain.backbone.scan
  plain_sd = vit.to_torch_state_dict(plain.backbone)
  scanned_sd = vit.to_torch_state_dict(scanned.backbone)
  assert plain_sd.keys() == scanned_sd.keys()
  for name in plain_sd:
    np.testing.assert_array_equal(plain_sd[name], scanned_sd[name], err_msg=name)
  assert (jax.tree.structure(nnx.state(plain, nnx.Param))
          == jax.tree.structure(nnx.state(scanned, nnx.Param)))


def test_train_step_with_remat_and_scan_equals_the_plain_step(tiny_config):
  """Inside the jitted update (teacher merged outside the gradient, student inside), both
  options together give the plain step's loss and updated parameters."""
  rng = np.random.default_rng(0)
  batch = {"frames": rng.integers(0, 256, (4, 2, 32, 32, 3)).astype(np.uint8),
           "crops": rng.integers(0, 256, (4, 2, 2, 16, 16, 3)).astype(np.uint8)}
  results = []
  for options in ({"model.scan": False, "model.remat": "none"},
                  {"model.remat": "dots", "model.scan": True}):
    config = tiny_config(**{"model.depth": 3, "model.drop_path_rate": 0.2, **options})
    plan = plan_lib.TrainPlan.from_config(config)
    graphdef, state = train_step.init_train_state(config, plan, rng=jax.random.PRNGKey(0))
    step = jax.jit(train_step.make_train_step(config, plan, graphdef))
    schedule = schedules.make_schedules(config, steps_per_epoch=10, total_steps=100).at(0)
    results.append(step(state, batch, schedule))
  (plain_state, plain_metrics), (state, metrics) = results
  np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.to_pure_dict(state["student"]), nnx.to_pure_dict(plain_state["student"]))


def test_remat_is_none_dots_or_full_and_never_a_bool():
  assert [vit.remat_policy(v) for v in ("none", "dots", "full")] == ["none", "dots", "full"]
  for remat in (True, False, 1, "true", "FULL", "some"):
    with pytest.raises(ValueError) as error:
      vit.remat_policy(remat)
    assert str(error.value) == f"model.remat is {remat!r}; use one of none, dots, full."
  with pytest.raises(ValueError, match=r"^model\.remat is True; "):
    vit.VisionTransformer(dim=32, depth=2, num_heads=4, patch_size=8, img_size=32, remat=True,
                          rngs=nnx.Rngs(0))


@pytest.mark.parametrize("remat", ["true", "false", "Full", ""])
def test_trainer_checks_refuse_other_remat_values(tiny_config, remat):
  # What `--config.model.remat=true` gives: one line naming the key and the values, from the
  # trainer's checks, before anything compiles.
  with pytest.raises(preflight.ConfigError) as error:
    preflight.check_config(tiny_config(**{"model.remat": remat}))
  assert str(error.value) == f"config model: model.remat is {remat!r}; use one of none, dots, full."
