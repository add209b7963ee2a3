"""Initialisers shared by the ViT and the DINO head, matching DINO's PyTorch initialisation."""
import math

import jax
import jax.numpy as jnp


def trunc_normal_init():
  """DINO's trunc_normal_(std=.02, a=-2, b=2).

  The bounds are absolute, i.e. +-100 std, so the std stays 0.02 (jax's default bounds of
  +-2 std would shrink it to 0.0176).
  """
  return jax.nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def torch_default_init(fan_in: int):
  """PyTorch's default Conv/Linear init, U(+-1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
