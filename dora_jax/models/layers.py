"""Pieces shared by the ViT and the DINO head: DINO's PyTorch initialisers, and the
rematerialisation (jax.checkpoint) policies of a block's backward pass."""
import math

from flax import nnx
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


# What the backward pass keeps of a block's forward (`model.remat`): "none" everything jax saves,
# "dots" the outputs of the matmuls with the weights (norms, GELU, softmax and the attention's
# q k^T and attn v products recomputed), "full" only the block's input.
REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(remat: str) -> str:
  """`config.model.remat`, checked to be one of `REMAT_POLICIES`: a bool is an error (True would
  not say which policy)."""
  if not isinstance(remat, str) or remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat is {remat!r}; use one of {', '.join(REMAT_POLICIES)}.")
  return remat


def checkpointed(fn, policy: str):
  """`fn` under jax.checkpoint with `policy` (see REMAT_POLICIES); `fn` itself for "none"."""
  if policy == "none":
    return fn
  saveable = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots"
              else None)  # None: save nothing but the inputs.
  return jax.checkpoint(fn, policy=saveable)


def rematerialised(block: nnx.Module, x: jax.Array, rng: jax.Array | None, *, policy: str):
  """`block(x, rng)` under jax.checkpoint, as a pure function of the block's state (nnx.remat
  would write the state back, which fails inside jax.grad of a merged model)."""
  graphdef, state = nnx.split(block)
  return checkpointed(lambda state, x, rng: nnx.merge(graphdef, state)(x, rng), policy)(
      state, x, rng)
