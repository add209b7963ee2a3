"""model.remat: each ViT block under jax.checkpoint gives the same outputs and gradients."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import config_base
from dora_jax.models import dino


def _model(remat):
  config = config_base.get_base_config().model
  config.update(dim=32, depth=2, num_heads=4, patch_size=8, out_dim=24, head_hidden_dim=32,
                head_bottleneck_dim=16, remat=remat)
  return dino.build_model(config, img_size=32, rngs=nnx.Rngs(0))


def test_remat_keeps_outputs_and_gradients():
  images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)
  key = jax.random.PRNGKey(1)  # Drop path on: the recomputed blocks must draw the same masks.

  def loss_and_outputs(remat):
    graphdef, params = nnx.split(_model(remat), nnx.Param)

    def loss(params):
      logits, out = nnx.merge(graphdef, params)(images, drop_path_rng=key)
      return jnp.sum(jnp.sin(logits)) + jnp.sum(out["attn"] ** 2), (logits, out)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    jaxpr = str(jax.make_jaxpr(grad_fn)(params))
    (_, outputs), grads = jax.jit(grad_fn)(params)
    return jaxpr, outputs, nnx.to_pure_dict(grads)

  plain_jaxpr, plain_outputs, plain_grads = loss_and_outputs(False)
  remat_jaxpr, remat_outputs, remat_grads = loss_and_outputs(True)
  assert "remat" in remat_jaxpr and "remat" not in plain_jaxpr  # jax.checkpoint's primitive.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               remat_outputs, plain_outputs)
  flat_plain = jax.tree.leaves(plain_grads)
  assert any(np.abs(g).max() > 0 for g in flat_plain)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat_grads, plain_grads)
