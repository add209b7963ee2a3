"""The DINO loss and centre against a hand computation in NumPy."""
import jax.numpy as jnp
import numpy as np
import pytest

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



def test_dino_loss_averages_several_masked_views_and_crops():
  # V = 3 different masked views and M = 2 crops of each of T = 2 frames of B = 2 clips, against
  # a float64 loop over clips, frames, views and crops: a sum over views (or over crops, or a
  # different weighting of the two terms) gives another value.
  rng = np.random.default_rng(2)
  clips, frames, views, crops, k = 2, 2, 3, 2, 6
  teacher_probs = _softmax(rng.normal(size=(clips, frames, k)) * 3)
  masked = rng.normal(size=(clips, frames, views, k)) * 2
  local = rng.normal(size=(clips, frames, crops, k)) * 2
  ce = lambda q, s: -np.sum(q * np.log(_softmax(s / 0.1)))
  masked_terms, per_frame = [], []
  for b in range(clips):
    for t in range(frames):
      masked_term = np.mean([ce(teacher_probs[b, t], masked[b, t, v]) for v in range(views)])
      local_term = np.mean([ce(teacher_probs[b, t], local[b, t, m]) for m in range(crops)])
      masked_terms.append(masked_term)
      per_frame.append(0.5 * masked_term + 0.5 * local_term)
  probs = jnp.asarray(teacher_probs, jnp.float32)
  got = losses.dino_loss(probs, jnp.asarray(masked, jnp.float32),
                         jnp.asarray(local, jnp.float32), student_temp=0.1)
  np.testing.assert_allclose(float(got), np.mean(per_frame), rtol=1e-5)
  only_masked = losses.dino_loss(probs, jnp.asarray(masked, jnp.float32), None, student_temp=0.1)
  np.testing.assert_allclose(float(only_masked), np.mean(masked_terms), rtol=1e-5)

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_dino_multicrop_loss_is_dinos_pairing():
  # DINOLoss (facebookresearch/dino) by hand, in float64: for each teacher global view iq and
  # each student view v != iq, the batch mean of CE, then the mean over those pairs.
  rng = np.random.default_rng(0)
  images, num_global, num_views, k = 3, 2, 5, 7  # 2 global + 3 local crops per image.
  teacher_probs = _softmax(rng.normal(size=(images, num_global, k)) * 3)
  student = rng.normal(size=(images, num_views, k)) * 2
  log_p = np.log(_softmax(student / 0.1))
  total, pairs = 0.0, 0
  for iq in range(num_global):
    for v in range(num_views):
      if v == iq:
        continue
      total += np.mean(-np.sum(teacher_probs[:, iq] * log_p[:, v], -1))
      pairs += 1
  expected = total / pairs
  assert pairs == num_global * (num_views - 1)
  got = losses.dino_multicrop_loss(jnp.asarray(teacher_probs, jnp.float32),
                                   jnp.asarray(student, jnp.float32), student_temp=0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Leading axes (B, T) are images too: the same value with the images split over two axes.
  got_bt = losses.dino_multicrop_loss(
      jnp.asarray(np.concatenate([teacher_probs, teacher_probs])).reshape(2, 3, num_global, k),
      jnp.asarray(np.concatenate([student, student])).reshape(2, 3, num_views, k),
      student_temp=0.1)
  np.testing.assert_allclose(float(got_bt), expected, rtol=1e-5)


def test_dino_multicrop_loss_leaves_out_same_view_terms():
  # Teacher view 0 is certain of class 0, view 1 of class 1; the student answers class 1 on view
  # 0 and class 0 on view 1. Each cross-view pair then costs 0 and each same-view pair
  # 100 / 0.1 = 1000 nats: only the same-view terms (which DINO skips) are non-zero.
  teacher_probs = jnp.asarray([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (1, G=2, K=3)
  swapped = jnp.asarray([[[0.0, 100.0, 0.0], [100.0, 0.0, 0.0]]])  # (1, V=2, 3)
  assert float(losses.dino_multicrop_loss(teacher_probs, swapped, student_temp=0.1)) < 1e-6
  # The same student answers on the teacher's own views: both cross-view pairs cost 1000.
  same = swapped[:, ::-1]
  np.testing.assert_allclose(
      float(losses.dino_multicrop_loss(teacher_probs, same, student_temp=0.1)), 1000.0,
      rtol=1e-6)
  # With a local crop the student is unsure about (CE log K against either teacher view):
  # pairs (0, 1), (0, 2), (1, 0), (1, 2).
  with_local = jnp.concatenate([swapped, jnp.zeros((1, 1, 3))], axis=1)
  np.testing.assert_allclose(
      float(losses.dino_multicrop_loss(teacher_probs, with_local, student_temp=0.1)),
      (0.0 + np.log(3.0) + 0.0 + np.log(3.0)) / 4, rtol=1e-6)


def test_dino_multicrop_loss_needs_the_global_views_first():
  probs = jnp.ones((2, 2, 4)) / 4
  with pytest.raises(ValueError, match="must hold the 2 global views"):
    losses.dino_multicrop_loss(probs, jnp.zeros((2, 1, 4)), student_temp=0.1)


def test_center_averages_both_global_views():
  rng = np.random.default_rng(1)
  teacher_logits = rng.normal(size=(2, 1, 2, 5))  # (B, T, G, K): DINO's two global views.
  new_center = losses.update_center(jnp.zeros(5), jnp.asarray(teacher_logits), 0.9)
  np.testing.assert_allclose(np.asarray(new_center),
                             0.1 * teacher_logits.reshape(-1, 5).mean(0), rtol=1e-6)
