"""The DoRA kernels against NumPy float64 references and a constructed scene."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax import tracking


def numpy_sinkhorn(scores: np.ndarray, epsilon: float, num_iters: int) -> np.ndarray:
  """Log-domain Sinkhorn-Knopp in float64, column update first (as ott orders them)."""
  cost = -scores.astype(np.float64)
  k, n = cost.shape
  log_a, log_b = np.log(np.full(k, 1.0 / k)), np.log(np.full(n, 1.0 / n))
  f, g = np.zeros(k), np.zeros(n)

  def lse(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))

  for _ in range(num_iters):
    g = epsilon * log_b - epsilon * lse((f[:, None] - cost) / epsilon, axis=0)
    f = epsilon * log_a - epsilon * lse((g[None, :] - cost) / epsilon, axis=1)
  return np.exp((f[:, None] + g[None, :] - cost) / epsilon)


@pytest.mark.parametrize("num_iters", [3, 30])
def test_sinkhorn_matches_numpy_float64(num_iters):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(2, 3, 5, 40)).astype(np.float32) * 0.3
  plan = np.asarray(tracking.sinkhorn(jnp.asarray(scores), epsilon=0.05, num_iters=num_iters))
  assert plan.shape == scores.shape
  for index in np.ndindex(2, 3):
    reference = numpy_sinkhorn(scores[index], 0.05, num_iters)
    np.testing.assert_allclose(plan[index], reference, rtol=2e-4, atol=1e-7)


def test_sinkhorn_marginals():
  rng = np.random.default_rng(1)
  k, n = 4, 64
  scores = jnp.asarray(rng.normal(size=(3, k, n)), jnp.float32)
  column_errors = []
  for num_iters in (1, 3, 10, 100):
    plan = np.asarray(tracking.sinkhorn(scores, epsilon=0.05, num_iters=num_iters), np.float64)
    # The row (prototype) potential is updated last: rows are exact.
    np.testing.assert_allclose(plan.sum(-1), 1.0 / k, rtol=1e-5)
    np.testing.assert_allclose(plan.sum((-1, -2)), 1.0, rtol=1e-5)
    column_errors.append(np.abs(plan.sum(-2) - 1.0 / n).max())
  assert column_errors == sorted(column_errors, reverse=True), column_errors
  assert column_errors[-1] < 0.05 * column_errors[0]


def test_sinkhorn_finite_for_large_scores():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(3, 196))
  scores = 100.0 * scores / np.linalg.norm(scores, axis=-1, keepdims=True)
  plan = np.asarray(tracking.sinkhorn(jnp.asarray(scores, jnp.float32), epsilon=0.05,
                                      num_iters=3))
  assert np.all(np.isfinite(plan))
  np.testing.assert_allclose(plan.sum(), 1.0, rtol=1e-5)


def test_sinkhorn_vmaps_and_jits():
  scores = jax.random.normal(jax.random.PRNGKey(0), (6, 3, 20))
  direct = tracking.sinkhorn(scores, epsilon=0.1, num_iters=5)
  mapped = jax.jit(jax.vmap(lambda s: tracking.sinkhorn(s, epsilon=0.1, num_iters=5)))(scores)
  np.testing.assert_allclose(np.asarray(direct), np.asarray(mapped), rtol=1e-5, atol=1e-8)


def test_discover_pools_chosen_heads_queries():
  rng = np.random.default_rng(3)
  batch, heads, tokens, head_dim, k = 2, 4, 10, 3, 2
  attn = rng.random((batch, heads, tokens, tokens)).astype(np.float32)
  queries = rng.normal(size=(batch, heads, tokens, head_dim)).astype(np.float32)
  key = jax.random.PRNGKey(7)
  prototypes = np.asarray(tracking.discover(jnp.asarray(attn), jnp.asarray(queries), key,
                                            num_objects=k))
  chosen = np.asarray(tracking.choose_heads(key, batch, heads, k))
  assert prototypes.shape == (batch, k, heads * head_dim)
  for b in range(batch):
    assert len(set(chosen[b])) == k
    patch_queries = np.concatenate([queries[b, h, 1:] for h in range(heads)], axis=-1)  # (N, d)
    for i, head in enumerate(chosen[b]):
      expected = attn[b, head, 0, 1:].astype(np.float64) @ patch_queries
      np.testing.assert_allclose(prototypes[b, i], expected, rtol=1e-5, atol=1e-6)


def test_refine_gives_convex_combinations():
  rng = np.random.default_rng(4)
  prototypes = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(2, 30, 16)), jnp.float32)
  refined, plan = tracking.refine(prototypes, tokens, epsilon=0.05, num_iters=3)
  plan = np.asarray(plan, np.float64)
  patches = np.asarray(tokens, np.float64)
  patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
  weights = 3 * plan  # rows sum to one: convex weights
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert np.all(weights >= 0)
  np.testing.assert_allclose(np.asarray(refined), weights @ patches, rtol=1e-4, atol=1e-6)


def test_track_rows_are_distributions_over_patches():
  rng = np.random.default_rng(5)
  prototypes = rng.normal(size=(2, 3, 8)).astype(np.float32)
  keys = rng.normal(size=(2, 4, 12, 8)).astype(np.float32)
  heatmaps = np.asarray(tracking.track(jnp.asarray(prototypes), jnp.asarray(keys)))
  assert heatmaps.shape == (2, 4, 3, 12)
  np.testing.assert_allclose(heatmaps.sum(-1), 1.0, rtol=1e-5)
  logits = np.einsum("bkd,btnd->btkn", prototypes, keys) / np.sqrt(8.0)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(heatmaps, expected, rtol=1e-4, atol=1e-6)


def test_object_masks_threshold_and_nearest_upsampling():
  rng = np.random.default_rng(6)
  heatmaps = rng.random((2, 3, 2, 12)).astype(np.float32)  # grid 3 x 4
  masks = np.asarray(tracking.object_masks(jnp.asarray(heatmaps), grid_size=(3, 4),
                                           image_size=(6, 12)))
  assert masks.shape == (2, 3, 2, 6, 12) and masks.dtype == bool
  on_grid = heatmaps > heatmaps.mean(-1, keepdims=True)
  expected = np.kron(on_grid.reshape(2, 3, 2, 3, 4), np.ones((2, 3))).astype(bool)
  np.testing.assert_array_equal(masks, expected)
  fixed = np.asarray(tracking.object_masks(jnp.asarray(heatmaps), grid_size=(3, 4),
                                           image_size=(3, 4), threshold=0.5))
  np.testing.assert_array_equal(fixed, (heatmaps > 0.5).reshape(2, 3, 2, 3, 4))


def _scene(rng, grid=8, num_objects=3, frames=3, head_dim=8, patch=4, noise=0.05):
  """Anchor label map of k regions; frame t shows it rolled by t * (2, 3) patches.

  Every patch of object i has embedding e_i (+ noise) and key alpha * e_i; head i's [CLS]
  attention puts 70% of its mass on object i and spreads the rest over all patches.
  """
  num_patches = grid * grid
  width = num_objects * head_dim
  labels = np.zeros((grid, grid), np.int64)
  labels[:, 3:6] = 1
  labels[:, 6:] = 2
  labels[5:, :3] = 1
  labels[6:, 3:6] = 2
  label_maps = np.stack([np.roll(labels, (2 * t, 3 * t), axis=(0, 1)) for t in range(frames)])
  basis = np.linalg.qr(rng.normal(size=(width, width)))[0][:num_objects]  # orthonormal e_i
  flat_labels = label_maps.reshape(frames, num_patches)
  embeddings = basis[flat_labels] + noise * rng.normal(size=(frames, num_patches, width))
  keys_full = 40.0 * embeddings
  attn = np.zeros((num_objects, num_patches + 1, num_patches + 1))
  for head in range(num_objects):
    on_object = (flat_labels[0] == head).astype(np.float64)
    attn[head, 0, 1:] = 0.7 * on_object / on_object.sum() + 0.3 / num_patches
  split_heads = lambda x: x.reshape(x.shape[0], num_objects, head_dim).transpose(1, 0, 2)
  with_cls = lambda x: np.concatenate([np.zeros((1, width)), x], axis=0)
  queries = split_heads(with_cls(embeddings[0]))  # (h, N+1, d_head)
  keys = np.stack([split_heads(with_cls(keys_full[t])) for t in range(frames)])
  pixel_labels = np.kron(label_maps, np.ones((patch, patch), np.int64))  # (T, H, W)
  f32 = lambda x: jnp.asarray(x[None], jnp.float32)
  return dict(attn=f32(attn), queries=f32(queries), tokens=f32(embeddings[0]),
              keys=f32(keys), pixel_labels=pixel_labels, grid=grid, patch=patch)


def _iou(a, b):
  return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def test_tracking_recovers_moving_objects():
  scene = _scene(np.random.default_rng(8))
  key = jax.random.PRNGKey(0)
  prototypes = tracking.discover(scene["attn"], scene["queries"], key, num_objects=3)
  refined, _ = tracking.refine(prototypes, scene["tokens"], epsilon=0.05, num_iters=3)
  heatmaps = tracking.track(refined, tracking.concat_heads(scene["keys"][:, :, :, 1:]))
  size = scene["grid"] * scene["patch"]
  masks = np.asarray(tracking.object_masks(heatmaps, grid_size=(scene["grid"],) * 2,
                                           image_size=(size, size)))[0]  # (T, k, H, W)
  heads = np.asarray(tracking.choose_heads(key, 1, 3, 3))[0]  # object i was found by head i
  for t in range(masks.shape[0]):
    for i, head in enumerate(heads):
      iou = _iou(masks[t, i], scene["pixel_labels"][t] == head)
      assert iou >= 0.9, (t, i, iou)


def test_apply_masks_remove_and_keep():
  rng = np.random.default_rng(9)
  frames = jnp.asarray(rng.normal(size=(4, 2, 8, 8, 3)) + 5.0, jnp.float32)  # no zero pixels
  masks = jnp.asarray(rng.random((4, 2, 3, 8, 8)) > 0.6)
  key = jax.random.PRNGKey(3)
  views, visible = tracking.apply_masks(frames, masks, key, mode="remove")
  views, visible, frames_np, masks_np = map(np.asarray, (views, visible, frames, masks))
  assert views.shape == (4, 2, 1, 8, 8, 3)
  chosen = np.asarray(tracking.choose_objects(key, 4, 3))
  assert chosen.any(axis=1).all()
  removed = np.any(masks_np & chosen[:, None, :, None, None], axis=2)  # (B, T, H, W)
  np.testing.assert_array_equal(views[:, :, 0] == 0, np.repeat(removed[..., None], 3, -1))
  np.testing.assert_array_equal(views[:, :, 0][~removed], frames_np[~removed])
  np.testing.assert_array_equal(visible[:, :, 0], ~removed)

  kept, kept_visible = tracking.apply_masks(jnp.asarray(frames_np), jnp.asarray(masks_np), key,
                                            mode="keep")
  kept = np.asarray(kept)
  assert kept.shape == (4, 2, 3, 8, 8, 3)
  for i in range(3):
    np.testing.assert_array_equal(kept[:, :, i][masks_np[:, :, i]], frames_np[masks_np[:, :, i]])
    assert np.all(kept[:, :, i][~masks_np[:, :, i]] == 0)
  np.testing.assert_array_equal(np.asarray(kept_visible), masks_np)


def test_choose_objects_covers_every_nonempty_subset():
  chosen = np.asarray(tracking.choose_objects(jax.random.PRNGKey(0), 2000, 3))
  codes = chosen @ (1 << np.arange(3))
  counts = np.bincount(codes, minlength=8)
  assert counts[0] == 0
  assert np.all(counts[1:] > 2000 / 7 * 0.7), counts


def test_bad_inputs_raise_value_errors_naming_the_argument():
  attn = jnp.zeros((1, 2, 5, 5))
  queries = jnp.zeros((1, 2, 5, 4))
  with pytest.raises(ValueError, match="num_objects"):
    tracking.discover(attn, queries, jax.random.PRNGKey(0), num_objects=3)
  with pytest.raises(ValueError, match="attn"):
    tracking.discover(jnp.zeros((2, 5, 5)), queries, jax.random.PRNGKey(0), num_objects=1)
  with pytest.raises(ValueError, match="frame_keys"):
    tracking.track(jnp.zeros((1, 2, 8)), jnp.zeros((1, 4, 8)))
  with pytest.raises(ValueError, match="mode"):
    tracking.apply_masks(jnp.zeros((1, 2, 4, 4, 3)), jnp.zeros((1, 2, 1, 4, 4), bool),
                         jax.random.PRNGKey(0), mode="blur")
  with pytest.raises(ValueError, match="masks"):
    tracking.apply_masks(jnp.zeros((1, 2, 4, 4, 3)), jnp.zeros((1, 3, 1, 4, 4), bool),
                         jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="num_iters"):
    tracking.sinkhorn(jnp.zeros((2, 3)), epsilon=0.05, num_iters=0)
