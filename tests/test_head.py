"""DINO head and DinoModel tests: NumPy float64 reference, weight norm, names, builder."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from dora_jax import config_base
from dora_jax.models import dino
from dora_jax.models import head as head_lib
from dora_jax.models import torch_names
from dora_jax.models import vit

# The sizes of `tiny_model_config`, so all tests share compiled initialisers.
IN, HIDDEN, BOTTLENECK, OUT = 32, 24, 8, 12


def random_head_weights(num_layers=3, seed=0):
  """A DINO head's weights under its PyTorch names (checkpoint['teacher'] style)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  widths = [IN] + [HIDDEN] * (num_layers - 1) + [BOTTLENECK]
  names = ["mlp"] if num_layers == 1 else [f"mlp.{2 * i}" for i in range(num_layers)]
  sd = {}
  for name, w_in, w_out in zip(names, widths[:-1], widths[1:]):
    sd[f"head.{name}.weight"] = 0.5 * normal(w_out, w_in)
    sd[f"head.{name}.bias"] = 0.5 * normal(w_out)
  sd["head.last_layer.weight_g"] = (1 + 0.5 * rng.random((OUT, 1))).astype(np.float32)
  sd["head.last_layer.weight_v"] = normal(OUT, BOTTLENECK)
  sd["backbone.cls_token"] = normal(1, 1, IN)  # Skipped by the head loader.
  return sd


def numpy_head(sd, x):
  """DINOHead.forward in float64: MLP, F.normalize, weight_norm(Linear(bias=False))."""
  sd = {k.removeprefix("head."): np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(x, np.float64)
  layers = sorted({k.rsplit(".", 1)[0] for k in sd if k.startswith("mlp")},
                  key=lambda n: int(n.split(".")[1]) if "." in n else 0)
  for i, name in enumerate(layers):
    x = x @ sd[name + ".weight"].T + sd[name + ".bias"]
    if i < len(layers) - 1:
      x = 0.5 * x * (1 + special.erf(x / np.sqrt(2)))
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  v = sd["last_layer.weight_v"]
  weight = sd["last_layer.weight_g"] * v / np.linalg.norm(v, axis=1, keepdims=True)
  return x @ weight.T


def inputs(batch=5, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, IN)), jnp.float32)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_head_matches_numpy(num_layers):
  sd = random_head_weights(num_layers)
  head = head_lib.head_from_torch_state_dict(sd)
  x = inputs()
  logits = head(x)
  assert logits.shape == (5, OUT) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), numpy_head(sd, x), rtol=0, atol=1e-5)
  # Export gives back the same weights (without the prefix and the backbone entry).
  exported = head_lib.head_to_torch_state_dict(head)
  for name, value in exported.items():
    np.testing.assert_array_equal(value, sd["head." + name], err_msg=name)


def old_formula_head(head, x):
  """The head as first written, x @ (g v / ||v||): the weight normalised before the matmul."""
  for i, layer in enumerate(head.mlp):
    x = layer(x)
    if i < len(head.mlp) - 1:
      x = jax.nn.gelu(x, approximate=False)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), head_lib.NORMALIZE_EPS)
  v = head.last_layer_v[...]
  return x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True) * head.last_layer_g[...])


def test_scaled_matmul_equals_weight_normalised_matmul_and_its_gradient():
  """(x v) (g / ||v||) gives x (g v / ||v||)'s logits and gradients (float32 tolerance), and
  the gradient in v and g of a NumPy float64 derivation of the weight-normalised layer."""
  sd = random_head_weights()
  head = head_lib.head_from_torch_state_dict(sd)
  x = inputs()
  graphdef, params = nnx.split(head, nnx.Param)
  cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((5, OUT)), jnp.float32)
  loss = lambda fn: lambda p: jnp.sum(cotangent * fn(nnx.merge(graphdef, p), x))
  new_logits = head(x)
  np.testing.assert_allclose(new_logits, old_formula_head(head, x), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(new_logits, numpy_head(sd, x), rtol=0, atol=1e-5)
  new_grads = nnx.to_pure_dict(jax.grad(loss(lambda h, x: h(x)))(params))
  old_grads = nnx.to_pure_dict(jax.grad(loss(old_formula_head))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               new_grads, old_grads)

  # float64: logits_bj = z_b . v_j g_j / n_j, z the normalised bottleneck, n_j = ||v_j||.
  z = x
  for i, layer in enumerate(head.mlp):
    z = layer(z)
    if i < len(head.mlp) - 1:
      z = jax.nn.gelu(z, approximate=False)
  z = np.asarray(z, np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  v = np.asarray(head.last_layer_v[...], np.float64)  # (bottleneck, OUT)
  g = np.asarray(head.last_layer_g[...], np.float64)
  c = np.asarray(cotangent, np.float64)
  n = np.linalg.norm(v, axis=0)
  zv = z @ v  # (5, OUT)
  grad_g = np.sum(c * zv, axis=0) / n
  grad_v = (z.T @ c) * g / n - v * (np.sum(c * zv, axis=0) * g / n**3)
  np.testing.assert_allclose(new_grads["last_layer_g"], grad_g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_grads["last_layer_v"], grad_v, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_init():
  head = head_lib.DINOHead(IN, OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
  assert params["last_layer_v"].shape == (BOTTLENECK, OUT)
  assert params["last_layer_g"].shape == (OUT,)
  np.testing.assert_array_equal(params["last_layer_g"], np.ones(OUT))
  assert [params["mlp"][i]["kernel"].shape for i in range(3)] == [
      (IN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, BOTTLENECK)]
  kernels = np.concatenate([np.ravel(params["mlp"][i]["kernel"]) for i in range(3)])
  assert abs(kernels.std() - 0.02) < 0.0012  # DINO: trunc_normal_(std=.02), 1536 samples.
  for i in range(3):
    np.testing.assert_array_equal(params["mlp"][i]["bias"], 0.0)


def test_norm_last_layer_fixes_gain_at_one():
  head = head_lib.DINOHead(IN, OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK,
                         norm_last_layer=True, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
  assert "last_layer_g" not in params and "last_layer_v" in params
  # The effective prototypes (PyTorch's weight rows) have unit norm whatever v is.
  head.last_layer_v[...] = 3.0 * head.last_layer_v[...]
  np.testing.assert_allclose(np.linalg.norm(head.last_layer_weight(), axis=0), 1.0, atol=1e-6)
  # And it loads a DINO checkpoint saved with norm_last_layer=True (gain all ones).
  sd = random_head_weights()
  sd["head.last_layer.weight_g"] = np.ones((OUT, 1), np.float32)
  loaded = head_lib.head_from_torch_state_dict(sd, norm_last_layer=True)
  np.testing.assert_allclose(np.asarray(loaded(inputs())), numpy_head(sd, inputs()), atol=1e-5)


def test_head_loader_reports_bad_names():
  sd = random_head_weights()
  del sd["head.mlp.2.bias"]
  sd["head.mlp.1.running_mean"] = np.zeros(HIDDEN, np.float32)
  with pytest.raises(ValueError) as info:
    head_lib.head_from_torch_state_dict(sd)
  assert "mlp.2.bias" in str(info.value) and "mlp.1.running_mean" in str(info.value)
  with pytest.raises(ValueError, match="norm_last_layer=False"):  # A learned gain.
    head_lib.head_from_torch_state_dict(random_head_weights(), norm_last_layer=True)


def tiny_model_config():
  config = config_base.get_base_config().model
  config.update(dict(dim=32, depth=2, num_heads=4, patch_size=4, out_dim=12, head_hidden_dim=24,
                     head_bottleneck_dim=8))
  return config


def test_build_model_reads_the_config():
  config = tiny_model_config()
  config.compute_dtype = "bfloat16"
  # eval_shape: the structure without compiling every initialiser (and as the trainer plans).
  options = dino.ModelOptions.from_config(config)
  model = nnx.eval_shape(lambda: dino.build_model(options, img_size=16, rngs=nnx.Rngs(0)))
  assert isinstance(model, dino.DinoModel)
  assert model.backbone.size == vit.ViTSize(dim=32, depth=2, num_heads=4, patch_size=4)
  assert model.backbone.pos_embed.shape == (1, 17, 32)
  assert [b.drop_path_rate for b in model.backbone.blocks] == pytest.approx([0.0, 0.1])
  assert model.backbone.dtype == jnp.bfloat16 and model.head.dtype == jnp.bfloat16
  assert [layer.kernel.shape for layer in model.head.mlp] == [(32, 24), (24, 24), (24, 8)]
  assert model.head.last_layer_v.shape == (8, 12)
  assert not model.head.norm_last_layer and model.head.last_layer_g.shape == (12,)


def test_dino_model_call_under_jit():
  backbone_shapes = nnx.eval_shape(lambda: vit.VisionTransformer(
      None, img_size=16, dim=IN, depth=2, num_heads=4, patch_size=4, rngs=nnx.Rngs(0)))
  flat = torch_names.flatten(nnx.to_pure_dict(nnx.state(backbone_shapes)))
  rng = np.random.default_rng(0)
  backbone_sd = {torch_names.torch_name(path): 0.2 * rng.standard_normal(torch_names.torch_shape(path, v.shape))
                 for path, v in flat.items()}
  model = dino.DinoModel(vit.from_torch_state_dict(backbone_sd, None, **dict(
      dim=IN, depth=2, num_heads=4, patch_size=4)),
      head_lib.head_from_torch_state_dict(random_head_weights()))
  images = jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32)
  graphdef, params = nnx.split(model, nnx.Param)
  call = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
  logits, out = call(params, images)
  assert logits.shape == (3, OUT) and out["attn"].shape == (3, 4, 17, 17)
  np.testing.assert_allclose(logits, numpy_head(random_head_weights(), out["cls"]), atol=1e-5)


def test_model_options_reject_unknown_dtype_and_variant():
  config = tiny_model_config()
  config.compute_dtype = "float16"
  with pytest.raises(ValueError, match="compute_dtype"):
    dino.ModelOptions.from_config(config)
  config = config_base.get_base_config().model
  config.variant = "L/16"
  with pytest.raises(ValueError, match="'L/16'"):
    dino.ModelOptions.from_config(config)


def test_multi_crop_equals_a_call_per_group_and_its_gradient():
  """One head call on both groups' [CLS] tokens: the logits and the gradient of a loss on them
  equal those of one call per group (drop path on, the same keys)."""
  config = tiny_model_config()
  model = dino.build_model(dino.ModelOptions.from_config(config), img_size=16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  groups = [jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32),
            jnp.asarray(rng.standard_normal((5, 8, 8, 3)), jnp.float32)]
  keys = list(jax.random.split(jax.random.PRNGKey(1), 2))
  weights = [jnp.asarray(rng.standard_normal((3, 12)), jnp.float32),
             jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)]

  def loss(params, together):
    model = nnx.merge(graphdef, params)
    if together:
      logits = model.multi_crop(groups, keys)
    else:
      logits = [model(x, drop_path_rng=key)[0] for x, key in zip(groups, keys)]
    return sum(jnp.sum(w * jnp.tanh(l)) for w, l in zip(weights, logits)), logits

  (value_1, logits_1), grads_1 = jax.jit(jax.value_and_grad(
      lambda p: loss(p, True), has_aux=True))(params)
  (value_2, logits_2), grads_2 = jax.jit(jax.value_and_grad(
      lambda p: loss(p, False), has_aux=True))(params)
  assert [l.shape for l in logits_1] == [(3, 12), (5, 12)]
  for a, b in zip(logits_1, logits_2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value_1, value_2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_1, grads_2)
  # Drop path is really on (a key changes the logits), so the keys were passed to each group.
  other = nnx.merge(graphdef, params).multi_crop(groups, [None, None])
  assert not np.allclose(other[0], logits_1[0], atol=1e-4)
  with pytest.raises(ValueError, match="2 groups but 1 keys"):
    nnx.merge(graphdef, params).multi_crop(groups, keys[:1])
