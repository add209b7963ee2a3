"""The DINO loss as DoRA uses it (docs/DESIGN.md step 7), and its centre.

Per frame t the teacher's target is softmax((g_t - c) / tau_t) on the full frame. The student
answers on the masked view(s) of frame t and on its M local crops. The loss of a frame is

    1/2 * mean_v CE(target_t, student(masked view v))  +  1/2 * mean_m CE(target_t, student(crop m))

(the masked term alone when M = 0), averaged over frames and clips. This is the clean mean: the
public reference code drops local crop 0 and weights objects unevenly when it averages.

The DINO baseline uses DINO's own multi-crop loss (`dino_multicrop_loss`): each frame is an image
with G global views (the teacher's) and V >= G student views (the same G global views first, then
the local crops); the loss is the mean cross-entropy over every (teacher view i, student view j)
pair with j != i, as DINOLoss in facebookresearch/dino.
"""
import jax
import jax.numpy as jnp


def teacher_targets(teacher_logits: jax.Array, center: jax.Array,
                    temperature: jax.Array | float) -> jax.Array:
  """Centred, sharpened teacher distribution; no gradient. (..., K) -> (..., K) float32."""
  logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  return jax.nn.softmax((logits - center) / temperature, axis=-1)


def cross_entropy(targets: jax.Array, student_logits: jax.Array,
                  temperature: jax.Array | float) -> jax.Array:
  """-sum_K targets * log_softmax(student / temperature). (..., K), (..., K) -> (...)."""
  log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)


def dino_loss(teacher_probs: jax.Array, masked_logits: jax.Array,
              local_logits: jax.Array | None, *, student_temp: float) -> jax.Array:
  """DoRA's DINO loss, a scalar.

  Args:
    teacher_probs: (B, T, K) targets from `teacher_targets` on the full frames.
    masked_logits: (B, T, V, K) student logits on the V masked views of each frame.
    local_logits: (B, T, M, K) student logits on the local crops of each frame, or None.
    student_temp: tau_s.
  """
  masked_term = jnp.mean(
      cross_entropy(teacher_probs[:, :, None], masked_logits, student_temp), axis=-1)  # (B, T)
  if local_logits is None or local_logits.shape[2] == 0:
    return jnp.mean(masked_term)
  local_term = jnp.mean(
      cross_entropy(teacher_probs[:, :, None], local_logits, student_temp), axis=-1)
  return jnp.mean(0.5 * masked_term + 0.5 * local_term)


def dino_multicrop_loss(teacher_probs: jax.Array, student_logits: jax.Array, *,
                        student_temp: float) -> jax.Array:
  """DINO's loss: mean CE over the (teacher global view, student view) pairs of different views.

  Args:
    teacher_probs: (..., G, K) targets from `teacher_targets` on the G global views of each image.
    student_logits: (..., V, K) student logits on the V >= G views of the same images: views
      0..G-1 are the teacher's G global views in the same order, the rest the local crops.
    student_temp: tau_s.

  Returns:
    The mean over images (the leading axes) and over the G (V - 1) pairs (i, j), j != i, of
    CE(teacher_probs[i], student_logits[j]): the same-view terms (j == i) are left out.
  """
  num_global, num_views = teacher_probs.shape[-2], student_logits.shape[-2]
  if num_views < num_global or num_views < 2:
    raise ValueError(
        f"dino_multicrop_loss: student_logits {tuple(student_logits.shape)} must hold the "
        f"{num_global} global views of teacher_probs {tuple(teacher_probs.shape)} first, and at "
        "least 2 views in all.")
  log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  # HIGHEST: a float32 sum over K, as `cross_entropy` (TPU/GPU default einsums round to bf16/tf32).
  pair_ce = -jnp.einsum("...ik,...jk->...ij", teacher_probs.astype(jnp.float32), log_probs,
                        precision=jax.lax.Precision.HIGHEST)  # (..., G, V)
  different = ~jnp.eye(num_global, num_views, dtype=bool)
  per_image = jnp.sum(jnp.where(different, pair_ce, 0.0), axis=(-2, -1)) / (
      num_global * (num_views - 1))
  return jnp.mean(per_image)


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
  """EMA of the teacher's mean output over the (global) batch. (K,), (..., K) -> (K,)."""
  batch_center = jnp.mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]), axis=0)
  return center * momentum + jax.lax.stop_gradient(batch_center) * (1.0 - momentum)


def entropy(probs: jax.Array) -> jax.Array:
  """Mean entropy (nats) of distributions over the last axis (per sample: low by design at a
  sharp teacher temperature; near log K, the teacher outputs uniform)."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def batch_entropy(probs: jax.Array) -> jax.Array:
  """Entropy (nats) of the batch-mean distribution: the mean of `probs` (..., K) over all leading
  axes. Near 0: every row puts its mass on the same prototype (collapse onto one); log K: the
  rows together use all K evenly."""
  mean = jnp.mean(probs.reshape(-1, probs.shape[-1]).astype(jnp.float32), axis=0)
  return -jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-30)))


def prototypes_used(probs: jax.Array) -> jax.Array:
  """How many distinct prototypes are the argmax of some row of `probs` (..., K): int32 in
  [1, min(rows, K)]."""
  winners = jnp.argmax(probs.reshape(-1, probs.shape[-1]), axis=-1)
  return jnp.sum(jnp.zeros(probs.shape[-1], jnp.int32).at[winners].set(1))


def kl_divergence(probs: jax.Array, student_logits: jax.Array,
                  temperature: jax.Array | float) -> jax.Array:
  """Mean KL(teacher || student) over the leading axes."""
  return jnp.mean(cross_entropy(probs, student_logits, temperature)) - entropy(probs)
