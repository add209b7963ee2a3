"""The DoRA kernels against NumPy float64 references and a constructed scene."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax import tracking


def public_sinkhorn(scores: np.ndarray, epsilon: float, num_iters: int) -> np.ndarray:
  """The public DoRA code's Sinkhorn-Knopp in float64: (k, N) scores -> (k, N) plan of mass 1.

  Starts from exp((S - max S) / epsilon) scaled to mass 1; each iteration scales the prototypes'
  rows to 1/k, then the patches' columns to 1/N.
  """
  plan = np.exp((scores.astype(np.float64) - scores.max()) / epsilon)
  plan /= plan.sum()
  k, n = plan.shape
  for _ in range(num_iters):
    plan /= k * plan.sum(axis=1, keepdims=True)
    plan /= n * plan.sum(axis=0, keepdims=True)
  return plan


@pytest.mark.parametrize("num_iters", [1, 3, 30])
def test_sinkhorn_matches_numpy_float64(num_iters):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(2, 3, 5, 40)).astype(np.float32) * 0.3
  plan = np.asarray(tracking.sinkhorn(jnp.asarray(scores), epsilon=0.05, num_iters=num_iters))
  assert plan.shape == scores.shape
  for index in np.ndindex(2, 3):
    reference = public_sinkhorn(scores[index], 0.05, num_iters)
    np.testing.assert_allclose(plan[index], reference, rtol=2e-4, atol=1e-9)


def test_sinkhorn_marginals():
  rng = np.random.default_rng(1)
  k, n = 4, 64
  scores = jnp.asarray(rng.normal(size=(3, k, n)), jnp.float32)
  row_errors = []
  for num_iters in (1, 3, 10, 100):
    plan = np.asarray(tracking.sinkhorn(scores, epsilon=0.05, num_iters=num_iters), np.float64)
    # Each iteration ends on the patches: columns are exact after any count.
    np.testing.assert_allclose(plan.sum(-2), 1.0 / n, rtol=1e-5)
    np.testing.assert_allclose(plan.sum((-1, -2)), 1.0, rtol=1e-5)
    row_errors.append(np.abs(plan.sum(-1) - 1.0 / k).max())
  assert row_errors == sorted(row_errors, reverse=True), row_errors
  assert row_errors[-1] < 0.05 * row_errors[0]


def test_sinkhorn_finite_for_large_scores():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(3, 196))
  scores = 100.0 * scores / np.linalg.norm(scores, axis=-1, keepdims=True)
  plan = np.asarray(tracking.sinkhorn(jnp.asarray(scores, jnp.float32), epsilon=0.05,
                                      num_iters=3))
  assert np.all(np.isfinite(plan))
  np.testing.assert_allclose(plan.sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(plan.sum(0), 1.0 / 196, rtol=1e-4)


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


def test_discover_uses_the_given_heads():
  rng = np.random.default_rng(10)
  batch, heads, tokens, head_dim = 3, 5, 9, 2
  attn = rng.random((batch, heads, tokens, tokens))
  queries = rng.normal(size=(batch, heads, tokens, head_dim))
  chosen = np.array([[4, 0], [1, 3], [2, 1]])
  prototypes = jax.jit(lambda a, q, h: tracking.discover(a, q, None, num_objects=2, heads=h))(
      jnp.asarray(attn, jnp.float32), jnp.asarray(queries, jnp.float32), jnp.asarray(chosen))
  for b in range(batch):
    patch_queries = queries[b, :, 1:].transpose(1, 0, 2).reshape(tokens - 1, -1)  # (N, d)
    expected = attn[b, chosen[b], 0, 1:] @ patch_queries  # (k, d)
    np.testing.assert_allclose(np.asarray(prototypes[b]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads, message", [
    (np.array([[0, 1]]), "shape"),  # one clip for a batch of two
    (np.array([[0.0, 1.0], [2.0, 3.0]]), "integer"),
    (np.array([[0, 5], [1, 2]]), "0..4"),
    (np.array([[0, -1], [1, 2]]), "0..4"),
    (np.array([[3, 3], [1, 2]]), "distinct"),
])
def test_discover_rejects_bad_heads(heads, message):
  attn, queries = jnp.zeros((2, 5, 4, 4)), jnp.zeros((2, 5, 4, 2))
  with pytest.raises(ValueError, match="`heads`.*" + message):
    tracking.discover(attn, queries, None, num_objects=2, heads=heads)


def test_refine_assigns_each_patch_once():
  rng = np.random.default_rng(4)
  num_patches, k = 30, 3
  # Small scores (|S| / epsilon ~ 10), so that 30 iterations converge.
  prototypes = jnp.asarray(0.1 * rng.normal(size=(2, k, 16)), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(2, num_patches, 16)), jnp.float32)
  refined, plan = tracking.refine(prototypes, tokens, epsilon=0.05, num_iters=30)
  plan = np.asarray(plan, np.float64)
  patches = np.asarray(tokens, np.float64)
  patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
  assignment = num_patches * plan
  np.testing.assert_allclose(assignment.sum(-2), 1.0, rtol=1e-5)  # per patch
  np.testing.assert_allclose(assignment.sum(-1), num_patches / k, rtol=1e-2)  # per prototype
  assert np.all(assignment >= 0)
  np.testing.assert_allclose(np.asarray(refined), assignment @ patches, rtol=1e-4, atol=1e-5)


def public_pipeline(attn, queries, tokens, keys, heads, *, num_iters, epsilon=0.05):
  """The public DoRA code's discover, refine, track and mask in float64, for one batch.

  attn (B, h, N+1, N+1), queries (B, h, N+1, d_head), tokens (B, N, d), keys (B, T, h, N+1,
  d_head), heads (B, k). Returns the refined prototypes (B, k, d) and the (B, T, k, N) masks cut
  as the public code cuts them: every row L2-normalised, cut at the mean over the whole batch
  and the patches, per frame and object.
  """
  batch, frames = keys.shape[:2]
  width = tokens.shape[-1]
  # (h, N+1, d_head) -> (N, d), the patches' heads concatenated.
  merge = lambda x: x[:, 1:].transpose(1, 0, 2).reshape(x.shape[1] - 1, -1)
  refined = []
  for b in range(batch):
    prototypes = attn[b, heads[b], 0, 1:] @ merge(queries[b])  # (k, d)
    patches = tokens[b] / np.linalg.norm(tokens[b], axis=-1, keepdims=True)
    assignment = len(patches) * public_sinkhorn(prototypes @ patches.T, epsilon, num_iters)
    refined.append(assignment @ patches)
  refined = np.stack(refined)
  heatmaps = np.zeros((batch, frames) + refined.shape[1:2] + (len(tokens[0]),))
  for b, t in np.ndindex(batch, frames):
    logits = refined[b] @ merge(keys[b, t]).T / np.sqrt(width)
    heat = np.exp(logits - logits.max(-1, keepdims=True))
    heatmaps[b, t] = heat / heat.sum(-1, keepdims=True)
  normalised = heatmaps / np.linalg.norm(heatmaps, axis=-1, keepdims=True)
  return refined, normalised > normalised.mean(axis=(0, -1), keepdims=True)


def _random_clips(rng, batch=2, frames=3, heads=6, head_dim=8, grid=14, scale=3.0):
  tokens = grid * grid + 1
  logits = 2.0 * rng.normal(size=(batch, heads, tokens, tokens))
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  return dict(
      attn=attn / attn.sum(-1, keepdims=True),
      queries=scale * rng.normal(size=(batch, heads, tokens, head_dim)),
      keys=scale * rng.normal(size=(batch, frames, heads, tokens, head_dim)),
      tokens=rng.normal(size=(batch, tokens - 1, heads * head_dim)))


def _our_pipeline(clips, heads, num_iters, threshold):
  f32 = lambda name: jnp.asarray(clips[name], jnp.float32)
  prototypes = tracking.discover(f32("attn"), f32("queries"), None, num_objects=heads.shape[1],
                                 heads=jnp.asarray(heads))
  refined, _ = tracking.refine(prototypes, f32("tokens"), epsilon=0.05, num_iters=num_iters)
  heatmaps = tracking.track(refined, tracking.concat_heads(f32("keys")[:, :, :, 1:]))
  grid = int(np.sqrt(heatmaps.shape[-1]))
  masks = tracking.object_masks(heatmaps, grid_size=(grid, grid), image_size=(grid, grid),
                                threshold=threshold)
  return np.asarray(refined), np.asarray(masks).reshape(heatmaps.shape)


@pytest.mark.parametrize("num_iters", [3, 30])
def test_masks_and_prototypes_equal_the_public_algorithm(num_iters):
  rng = np.random.default_rng(11)
  clips = _random_clips(rng)
  heads = np.stack([rng.permutation(6)[:3] for _ in range(2)])
  refined, per_clip = _our_pipeline(clips, heads, num_iters, "mean")
  _, batch_coupled = _our_pipeline(clips, heads, num_iters, "batch_mean")
  reference, reference_masks = public_pipeline(**clips, heads=heads, num_iters=num_iters)
  error = np.linalg.norm(refined - reference, axis=-1) / np.linalg.norm(reference, axis=-1)
  assert error.max() < 1e-4, error
  np.testing.assert_array_equal(batch_coupled, reference_masks)
  assert 0.0 < reference_masks.mean() < 0.5
  # The reference on one clip at a time (its batch of one) cuts as "mean" does.
  for b in range(2):
    one = {name: value[b:b + 1] for name, value in clips.items()}
    _, one_masks = public_pipeline(**one, heads=heads[b:b + 1], num_iters=num_iters)
    np.testing.assert_array_equal(per_clip[b:b + 1], one_masks)


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


def test_batch_mean_threshold_is_the_public_rule():
  rng = np.random.default_rng(12)
  heatmaps = rng.random((4, 3, 2, 12)) ** 3  # (B, T, k, N), rows of different norms
  masks = np.asarray(tracking.object_masks(jnp.asarray(heatmaps, jnp.float32), grid_size=(3, 4),
                                           image_size=(3, 4), threshold="batch_mean"))
  normalised = heatmaps / np.linalg.norm(heatmaps, axis=-1, keepdims=True)
  expected = np.zeros(heatmaps.shape, bool)
  for t, i in np.ndindex(3, 2):  # the reference loops over frames and objects
    expected[:, t, i] = normalised[:, t, i] > normalised[:, t, i].mean()
  np.testing.assert_array_equal(masks.reshape(heatmaps.shape), expected)
  assert np.any(expected != (heatmaps > heatmaps.mean(-1, keepdims=True)))


@pytest.mark.parametrize("threshold, couples", [("mean", False), ("batch_mean", True)])
def test_only_batch_mean_couples_the_clips(threshold, couples):
  rng = np.random.default_rng(13)
  heatmaps = rng.random((2, 2, 3, 16)).astype(np.float32)
  other = heatmaps.copy()
  other[1] = 5.0 * heatmaps[1] ** 4  # only clip 1 changes: sharper, differently normalised rows
  masks_of = lambda h: np.asarray(tracking.object_masks(
      jnp.asarray(h), grid_size=(4, 4), image_size=(8, 8), threshold=threshold))
  changed = np.any(masks_of(heatmaps)[0] != masks_of(other)[0])
  assert changed == couples


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
  # The refined prototypes are about n_i e_i (n_i the patches of object i), so alpha = 1 gives
  # logit gaps of n_i / sqrt(d) ~ 3-5 between an object's patches and the others.
  keys_full = 1.0 * embeddings
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
  with pytest.raises(ValueError, match="threshold"):
    tracking.object_masks(jnp.zeros((1, 2, 4)), grid_size=(2, 2), image_size=(2, 2),
                          threshold="median")
  with pytest.raises(ValueError, match="heatmaps.*batch_mean"):
    tracking.object_masks(jnp.zeros((2, 4)), grid_size=(2, 2), image_size=(2, 2),
                          threshold="batch_mean")
