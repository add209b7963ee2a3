r"""Would `nnx.scan` over the ViT blocks pay? Compile time and speed, unrolled vs scanned.

  python benchmarks/scan_blocks.py --variant=S/16 --images=6 --steps=5

Builds the backbone of `--variant` once and differentiates a loss of its outputs two ways on the
same parameters:
  unrolled  the model as it is: a Python loop over the blocks (what the train step compiles);
  scanned   `jax.lax.scan` over the blocks' stacked parameters for blocks 0..depth-2 (one block
            body in the program) and the last block on its own, as a scan option would have to
            (DoRA reads the last block's attention, queries and keys).
It checks that both give the same outputs and gradients, then reports the compile time (lower +
compile, no persistent cache) and the median seconds of the forward+backward, interleaved.
The train step holds three backbone passes (teacher; student on the views and on the crops), so
the step's saving is about three times the one measured here.
"""
from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.models import vit

_VARIANT = flags.DEFINE_string("variant", "S/16", "ViT variant.")
_IMAGES = flags.DEFINE_integer("images", 6, "Images per forward (224 px).")
_SIZE = flags.DEFINE_integer("size", 224, "Image side.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed runs of each.")


def _scanned_forward(model: vit.VisionTransformer, images: jax.Array) -> dict[str, jax.Array]:
  """The backbone's forward with blocks 0..depth-2 under one lax.scan (no drop path)."""
  batch, height, width, _ = images.shape
  p, d = model.size.patch_size, model.size.dim
  x = model.patch_embed(images).astype(jnp.float32).reshape(batch, -1, d)
  x = jnp.concatenate([jnp.broadcast_to(model.cls_token[...], (batch, 1, d)), x], axis=1)
  x = x + vit.interpolate_pos_embed(model.pos_embed[...], (height // p, width // p))
  block_def, _ = nnx.split(model.blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                         *[nnx.state(block) for block in model.blocks[:-1]])

  def body(x, block_state):
    y, _ = nnx.merge(block_def, block_state)(x, None)
    return y, None

  x, _ = jax.lax.scan(body, x, stacked)
  x, aux = model.blocks[-1](x, None)
  x = model.norm(x)
  return {"cls": x[:, 0], "tokens": x[:, 1:], **aux}


def main(argv):
  del argv
  model = vit.VisionTransformer(_VARIANT.value, img_size=_SIZE.value, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((_IMAGES.value, _SIZE.value, _SIZE.value, 3)),
                       jnp.float32)

  def loss_fn(forward):
    def loss(params, images):
      out = forward(nnx.merge(graphdef, params), images)
      return jnp.sum(out["cls"] ** 2) + jnp.sum(out["tokens"][:, :4] ** 2) + jnp.sum(
          out["attn"][:, :, 0] ** 2)
    return jax.jit(jax.value_and_grad(loss))

  runs = {}
  for name, forward in (("unrolled", lambda m, x: m(x)), ("scanned", _scanned_forward)):
    fn = loss_fn(forward)
    start = time.perf_counter()
    compiled = fn.lower(params, images).compile()
    runs[name] = dict(compiled=compiled, compile=time.perf_counter() - start, times=[],
                      result=jax.block_until_ready(compiled(params, images)))
    print(f"compiled {name}: {runs[name]['compile']:.1f} s", flush=True)
  (loss_a, grads_a), (loss_b, grads_b) = runs["unrolled"]["result"], runs["scanned"]["result"]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_a, grads_b)
  for _ in range(_STEPS.value):
    for run in runs.values():
      start = time.perf_counter()
      jax.block_until_ready(run["compiled"](params, images))
      run["times"].append(time.perf_counter() - start)
  print(f"{_VARIANT.value}, {_IMAGES.value} images of {_SIZE.value} px, forward+backward; "
        "same loss and gradients (rtol 1e-4)")
  print(f"{'':<10} {'compile s':>9} {'s/run':>8}")
  for name, run in runs.items():
    print(f"{name:<10} {run['compile']:9.1f} {statistics.median(run['times']):8.3f}")


if __name__ == "__main__":
  app.run(main)
