"""ViT tests: PyTorch-named weights against an independent NumPy float64 forward pass."""
import logging
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from dora_jax.models import layers
from dora_jax.models import pos_embed
from dora_jax.models import torch_names
from dora_jax.models import vit

DIM, DEPTH, HEADS, PATCH, IMG = 32, 2, 4, 4, 16
TINY = dict(dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH)


def random_torch_weights(seed=0, img=IMG):
  """Random weights under DINO's PyTorch names and layouts (float32 numpy)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=0.2: (scale * rng.standard_normal(shape)).astype(np.float32)
  num_tokens = (img // PATCH) ** 2 + 1
  sd = {
      "cls_token": normal(1, 1, DIM, scale=1.0),
      "pos_embed": normal(1, num_tokens, DIM, scale=1.0),
      "patch_embed.proj.weight": normal(DIM, 3, PATCH, PATCH),
      "patch_embed.proj.bias": normal(DIM),
      "norm.weight": 1 + normal(DIM, scale=0.1),
      "norm.bias": normal(DIM, scale=0.1),
  }
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd.update({
        b + "norm1.weight": 1 + normal(DIM, scale=0.1), b + "norm1.bias": normal(DIM, scale=0.1),
        b + "attn.qkv.weight": normal(3 * DIM, DIM), b + "attn.qkv.bias": normal(3 * DIM),
        b + "attn.proj.weight": normal(DIM, DIM), b + "attn.proj.bias": normal(DIM),
        b + "norm2.weight": 1 + normal(DIM, scale=0.1), b + "norm2.bias": normal(DIM, scale=0.1),
        b + "mlp.fc1.weight": normal(4 * DIM, DIM), b + "mlp.fc1.bias": normal(4 * DIM),
        b + "mlp.fc2.weight": normal(DIM, 4 * DIM), b + "mlp.fc2.bias": normal(DIM),
    })
  return sd


def torch_bicubic_1d(values, out_size):
  """PyTorch F.interpolate(mode='bicubic', scale_factor=(out + .1) / in) along axis 0, by loops
  over output positions with the distance form of the Keys kernel (A = -0.75)."""
  a = -0.75

  def kernel(d):
    d = abs(d)
    if d <= 1:
      return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
      return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0

  in_size = values.shape[0]
  scale_factor = (out_size + 0.1) / in_size
  out = np.zeros((out_size,) + values.shape[1:])
  for o in range(out_size):
    src = (o + 0.5) / scale_factor - 0.5
    base = math.floor(src)
    for j in range(base - 1, base + 3):
      out[o] += kernel(src - j) * values[min(max(j, 0), in_size - 1)]
  return out


def numpy_forward(sd, images):
  """DINO's ViT forward in float64 NumPy. images (B, H, W, 3)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(images, np.float64)
  batch, height, width, _ = x.shape
  gh, gw = height // PATCH, width // PATCH
  patches = x.reshape(batch, gh, PATCH, gw, PATCH, 3)
  tokens = np.einsum("biujvc,dcuv->bijd", patches, sd["patch_embed.proj.weight"])
  tokens = tokens.reshape(batch, gh * gw, DIM) + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (batch, 1, DIM)), tokens], axis=1)
  pos = sd["pos_embed"]
  side = int(math.isqrt(pos.shape[1] - 1))
  if (gh, gw) != (side, side):
    grid = pos[0, 1:].reshape(side, side, DIM)
    grid = torch_bicubic_1d(grid, gh)  # rows
    grid = torch_bicubic_1d(grid.transpose(1, 0, 2), gw).transpose(1, 0, 2)  # columns
    pos = np.concatenate([pos[:, :1], grid.reshape(1, gh * gw, DIM)], axis=1)
  x = x + pos

  def layer_norm(v, prefix):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    return (v - mean) / np.sqrt(var + 1e-6) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

  def linear(v, prefix):
    return v @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

  head_dim = DIM // HEADS
  for i in range(DEPTH):
    b = f"blocks.{i}."
    qkv = linear(layer_norm(x, b + "norm1"), b + "attn.qkv")
    qkv = qkv.reshape(batch, -1, 3, HEADS, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) * head_dim ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, -1, DIM)
    x = x + linear(y, b + "attn.proj")
    h = linear(layer_norm(x, b + "norm2"), b + "mlp.fc1")
    h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    x = x + linear(h, b + "mlp.fc2")
  x = layer_norm(x, "norm")
  return {"cls": x[:, 0], "tokens": x[:, 1:], "attn": attn, "q": q, "k": k}


@nnx.jit
def forward(model, x):
  # One compiled program per input shape instead of ~100 eagerly compiled small ops.
  return model(x)


def images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_matches(out, ref, atol=1e-4):
  for key in ("cls", "tokens", "attn", "q", "k"):
    assert out[key].shape == ref[key].shape, key
    assert out[key].dtype == jnp.float32, key
    np.testing.assert_allclose(np.asarray(out[key]), ref[key], rtol=0, atol=atol, err_msg=key)


@pytest.mark.parametrize("prefix", ["", "module.backbone."])
def test_from_torch_matches_numpy_forward(prefix, caplog):
  sd = random_torch_weights()
  loaded = {prefix + k: v for k, v in sd.items()}
  # A full DINO checkpoint also holds the head: it is skipped, and the log says so.
  loaded[prefix.replace("backbone.", "") + "head.last_layer.weight_v"] = np.zeros((8, 4))
  # The absl logger's own level too: other code (e.g. orbax's quieting) may have raised it.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    model = vit.from_torch_state_dict(loaded, None, **TINY)
  assert "head.last_layer.weight_v" in caplog.text
  assert model.img_size == IMG  # Read from pos_embed.
  x = images((2, IMG, IMG, 3))
  assert_matches(forward(model, x), numpy_forward(sd, x))


def test_other_input_sizes_interpolate_pos_embed_like_pytorch():
  sd = random_torch_weights()
  model = vit.from_torch_state_dict(sd, None, **TINY)
  # Non-square: the 4 x 4 grid grows to 6 rows and shrinks to 3 columns (as a 112-px local
  # crop of a 224-px model does), so a swapped axis or a wrong kernel would show.
  x = images((2, 24, 12, 3))
  out = forward(model, x)
  assert out["tokens"].shape == (2, 6 * 3, DIM)
  assert_matches(out, numpy_forward(sd, x))


def test_pos_embed_interpolation_identity_and_constant():
  pos = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1 + 16, 5)), jnp.float32)
  assert pos_embed.interpolate_pos_embed(pos, (4, 4)) is pos
  matrix = pos_embed._bicubic_matrix(14, 7)
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)  # Constants stay constant.


def test_missing_unexpected_and_mismatched_names_are_reported():
  sd = random_torch_weights()
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.1.attn.relative_bias"] = np.zeros(3, np.float32)
  sd["norm.weight"] = np.ones(DIM + 1, np.float32)
  with pytest.raises(ValueError) as info:
    vit.from_torch_state_dict(sd, None, **TINY)
  message = str(info.value)
  assert "blocks.1.mlp.fc2.bias" in message
  assert "blocks.1.attn.relative_bias" in message
  assert f"norm.weight: expected ({DIM},), got ({DIM + 1},)" in message


def test_wrong_variant_for_checkpoint_raises():
  with pytest.raises(ValueError, match="blocks.2"):  # A depth-3 model misses block 2.
    vit.from_torch_state_dict(random_torch_weights(), None, **{**TINY, "depth": 3})
  with pytest.raises(ValueError, match="pos_embed"):
    vit.from_torch_state_dict(random_torch_weights(), None, img_size=32, **TINY)


@pytest.mark.parametrize("shape,dtype", [
    ((IMG, IMG, 3), jnp.float32),  # No batch axis.
    ((1, IMG, IMG, 4), jnp.float32),  # Four channels.
    ((1, 3, IMG, IMG), jnp.float32),  # Channels first.
    ((1, IMG + 2, IMG, 3), jnp.float32),  # Not a multiple of the patch.
    ((1, IMG, IMG, 3), jnp.uint8),  # Not normalised.
])
def test_bad_images_raise(shape, dtype):
  model = vit.from_torch_state_dict(random_torch_weights(), None, **TINY)
  with pytest.raises(ValueError, match=r"images has (shape|dtype)"):
    forward(model, jnp.zeros(shape, dtype))  # Raised while tracing, before XLA sees it.


def test_drop_path_only_with_rng_and_pure_under_jit():
  sd = random_torch_weights()
  model = vit.from_torch_state_dict(sd, None, drop_path_rate=0.5, **TINY)
  x = images((4, IMG, IMG, 3))
  ref = numpy_forward(sd, x)
  assert_matches(forward(model, x), ref)  # No rng: no stochastic depth.

  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, x, key: nnx.merge(graphdef, state)(x, drop_path_rng=key)["cls"])
  first = step(state, x, jax.random.key(0))
  np.testing.assert_array_equal(first, step(state, x, jax.random.key(0)))
  assert np.abs(np.asarray(first) - ref["cls"]).max() > 1e-2
  assert np.abs(np.asarray(first - step(state, x, jax.random.key(1)))).max() > 1e-2
  # The call did not touch the module's state.
  np.testing.assert_array_equal(vit.to_torch_state_dict(model)["pos_embed"], sd["pos_embed"])


def test_round_trip_to_torch_and_back():
  sd = random_torch_weights()
  model = vit.from_torch_state_dict(sd, None, **TINY)
  exported = vit.to_torch_state_dict(model)
  assert set(exported) == set(sd)
  for name, value in sd.items():  # Same names, PyTorch layouts and values, bit for bit.
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  again = vit.from_torch_state_dict(exported, None, **TINY)
  x = images((2, IMG, IMG, 3))
  out, out_again = forward(model, x), forward(again, x)
  for key in out:
    np.testing.assert_array_equal(out[key], out_again[key])


def test_init_matches_dino():
  # DINO: trunc_normal_(std=.02) for cls_token, pos_embed and Linear weights.
  sample = layers.trunc_normal_init()(jax.random.key(0), (64, 64))
  assert abs(float(jnp.std(sample)) - 0.02) < 0.001


def test_variants_and_parameter_layout():
  assert vit.parse_variant("S/16") == vit.ViTSize(384, 12, 6, 16)
  assert vit.parse_variant("B/8") == vit.ViTSize(768, 12, 12, 8)
  assert vit.parse_variant("Ti/16").dim == 192
  with pytest.raises(ValueError, match=r"'S/14'.*'B/16'"):
    vit.parse_variant("S/14")
  abstract = nnx.eval_shape(lambda: vit.VisionTransformer("S/16", rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  flat = torch_names.flatten(nnx.to_pure_dict(state))
  assert flat[("blocks", 11, "attn", "qkv", "kernel")].shape == (384, 3 * 384)
  assert flat[("pos_embed",)].shape == (1, 197, 384)
  assert flat[("cls_token",)].shape == (1, 1, 384)
  # Weight decay applies to ndim > 1: only biases and norm parameters are 1-D.
  one_d = {path[-1] for path, value in flat.items() if len(value.shape) == 1}
  assert one_d == {"bias", "scale"}
  assert sum(math.prod(v.shape) for v in flat.values()) == 21_665_664  # DINO ViT-S/16 backbone.


def test_bfloat16_compute_keeps_float32_outputs():
  sd = random_torch_weights()
  model = vit.from_torch_state_dict(sd, None, dtype=jnp.bfloat16, **TINY)
  x = images((2, IMG, IMG, 3))
  out = forward(model, x)
  ref = numpy_forward(sd, x)
  assert all(value.dtype == jnp.float32 for value in out.values())
  assert np.abs(np.asarray(out["cls"]) - ref["cls"]).max() < 0.2
  assert np.abs(np.asarray(out["cls"]) - ref["cls"]).max() > 0  # Really ran in bfloat16.
