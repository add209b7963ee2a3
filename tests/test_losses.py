"""The DINO loss and centre against a hand computation in NumPy."""
import jax.numpy as jnp
import numpy as np

from dora_jax import losses


def test_dino_loss_matches_hand_computation():
  teacher_logits = np.array([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # (B=1, T=2, K=3)
  center = np.array([0.1, 0.0, -0.1])
  masked = np.array([[[[0.2, 0.1, 0.0]], [[0.0, 0.3, 0.1]]]])  # (1, 2, V=1, 3)
  local = np.array([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                     [[0.0, 0.0, 1.0], [0.5, 0.0, 0.5]]]])  # (1, 2, M=2, 3)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  targets = softmax((teacher_logits - center) / 0.04)
  ce = lambda q, s: -np.sum(q * np.log(softmax(s / 0.1)), -1)
  expected = np.mean([0.5 * ce(targets[0, t], masked[0, t, 0])
                      + 0.5 * np.mean([ce(targets[0, t], local[0, t, m]) for m in range(2)])
                      for t in range(2)])
  probs = losses.teacher_targets(jnp.asarray(teacher_logits), jnp.asarray(center), 0.04)
  got = losses.dino_loss(probs, jnp.asarray(masked), jnp.asarray(local), student_temp=0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  only_masked = losses.dino_loss(probs, jnp.asarray(masked), None, student_temp=0.1)
  np.testing.assert_allclose(float(only_masked), np.mean([ce(targets[0, t], masked[0, t, 0])
                                                          for t in range(2)]), rtol=1e-5)
  new_center = losses.update_center(jnp.asarray(center), jnp.asarray(teacher_logits), 0.9)
  np.testing.assert_allclose(np.asarray(new_center),
                             0.9 * center + 0.1 * teacher_logits.reshape(-1, 3).mean(0), rtol=1e-6)
