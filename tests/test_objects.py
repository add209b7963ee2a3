"""DoRA's view construction: the options parsed once, the views from a teacher's outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax import config_base
from dora_jax import objects
from dora_jax import tracking


def _dora_config(**overrides):
  config = config_base.get_base_config().dora
  config.update(overrides)
  return config


def test_options_are_parsed_once_and_checked_with_the_key_in_the_message():
  options = objects.DoraOptions.from_config(_dora_config(mask_threshold="0.25"), num_heads=6)
  assert options == objects.DoraOptions(num_objects=3, sinkhorn_iters=3, sinkhorn_epsilon=0.05,
                                        mask_mode="remove", mask_threshold=0.25)
  for overrides, message in [({"num_objects": 7}, r"dora\.num_objects=7: .* 6 attention heads"),
                             ({"num_objects": 0}, r"dora\.num_objects=0"),
                             ({"mask_mode": "blur"}, r"dora\.mask_mode='blur'"),
                             ({"mask_threshold": "median"}, r"dora\.mask_threshold='median'"),
                             ({"sinkhorn_iters": 0}, r"dora\.sinkhorn_iters=0"),
                             ({"sinkhorn_epsilon": 0.0}, r"dora\.sinkhorn_epsilon=0\.0")]:
    with pytest.raises(ValueError, match=message):
      objects.DoraOptions.from_config(_dora_config(**overrides), num_heads=6)


def test_the_default_options_are_config_bases():
  """DoraOptions() is config_base's dora section parsed (its defaults are read, not retyped)."""
  base = objects.DoraOptions.from_config(config_base.get_base_config().dora, num_heads=6)
  assert objects.DoraOptions() == base
  assert objects.DoraOptions(num_objects=2) == objects.DoraOptions(
      2, base.sinkhorn_iters, base.sinkhorn_epsilon, base.mask_mode, base.mask_threshold)


def test_object_views_shapes_and_remove_mode_hides_chosen_objects():
  batch, frames, heads, size, patch, d_head = 2, 3, 4, 16, 4, 8
  tokens = (size // patch) ** 2 + 1
  rng = np.random.default_rng(0)
  attn = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch * frames, heads, tokens, tokens))), -1)
  teacher_out = {
      "attn": attn,
      "q": jnp.asarray(rng.normal(size=(batch * frames, heads, tokens, d_head)), jnp.float32),
      "k": jnp.asarray(rng.normal(size=(batch * frames, heads, tokens, d_head)), jnp.float32),
      "tokens": jnp.asarray(rng.normal(size=(batch * frames, tokens - 1, heads * d_head)),
                            jnp.float32),
  }
  images = jnp.asarray(rng.normal(size=(batch, frames, size, size, 3)), jnp.float32)
  options = objects.DoraOptions(num_objects=2)
  found = objects.object_views(options, teacher_out, images, jax.random.PRNGKey(1))
  assert found["heatmaps"].shape == (batch, frames, 2, tokens - 1)
  assert found["masks"].shape == (batch, frames, 2, size, size)
  assert found["views"].shape == (batch, frames, 1, size, size, 3)
  visible = np.asarray(found["visible"][:, :, 0])
  masks = np.asarray(found["masks"])
  # What is hidden is a union of whole object masks, the same objects in every frame of a clip.
  for b in range(batch):
    hidden = visible[b] == 0
    subsets = [s for s in ([True, False], [False, True], [True, True])
               if np.array_equal(hidden, np.any(masks[b][:, np.array(s)], axis=1))]
    assert subsets, f"clip {b}: the hidden pixels are not a union of object masks"
  np.testing.assert_array_equal(np.asarray(found["views"][:, :, 0]),
                                np.asarray(images) * visible[..., None])


def test_object_overlap_is_the_mean_pairwise_iou():
  rng = np.random.default_rng(8)
  masks = rng.random((2, 3, 3, 4, 5)) > 0.5  # (B, T, k, H, W)
  ious = []
  for b in range(2):
    for t in range(3):
      for i in range(3):
        for j in range(i + 1, 3):
          a, c = masks[b, t, i], masks[b, t, j]
          ious.append(np.logical_and(a, c).sum() / max(np.logical_or(a, c).sum(), 1))
  np.testing.assert_allclose(float(objects.object_overlap(jnp.asarray(masks))), np.mean(ious),
                             rtol=1e-6)
  same = np.repeat(masks[:, :, :1], 3, axis=2)
  assert float(objects.object_overlap(jnp.asarray(same))) == pytest.approx(1.0)


def _teacher_outputs(rng, batch=2, frames=3, heads=6, head_dim=8, grid=14, scale=3.0):
  """Random teacher outputs as `track_objects` takes them ((B*T, ...)), and the anchor's and every
  frame's arrays as `test_tracking.public_pipeline` takes them."""
  tokens = grid * grid + 1
  logits = 2.0 * rng.normal(size=(batch, heads, tokens, tokens))
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  clips = dict(attn=attn / attn.sum(-1, keepdims=True),
               queries=scale * rng.normal(size=(batch, heads, tokens, head_dim)),
               keys=scale * rng.normal(size=(batch, frames, heads, tokens, head_dim)),
               tokens=rng.normal(size=(batch, tokens - 1, heads * head_dim)))
  every_frame = lambda x: np.repeat(x[:, None], frames, 1).reshape((-1,) + x.shape[1:])
  teacher_out = {"attn": every_frame(clips["attn"]), "q": every_frame(clips["queries"]),
                 "k": clips["keys"].reshape((-1,) + clips["keys"].shape[2:]),
                 "tokens": every_frame(clips["tokens"])}
  teacher_out = {name: jnp.asarray(value, jnp.float32) for name, value in teacher_out.items()}
  return teacher_out, clips, (batch, frames, grid, grid)


def test_batch_mean_draws_the_heads_once_per_batch_as_the_public_code():
  from test_tracking import public_pipeline  # pylint: disable=g-import-not-at-top

  teacher_out, clips, clip_shape = _teacher_outputs(np.random.default_rng(11))
  key = jax.random.PRNGKey(3)
  per_clip = np.asarray(tracking.choose_heads(key, 2, 6, 3))
  assert not np.array_equal(per_clip[0], per_clip[1])  # A key for which clips' own draws differ.
  options = objects.DoraOptions(num_objects=3, sinkhorn_iters=3, mask_threshold="batch_mean")
  found = jax.jit(lambda out: objects.track_objects(options, out, clip_shape, key))(teacher_out)
  heads = np.asarray(found["heads"])
  assert np.array_equal(heads[0], heads[1]) and len(set(heads[0].tolist())) == 3
  assert 0 <= heads.min() and heads.max() < 6
  # The public rule in float64: those k heads for the whole batch, every heat-map row
  # L2-normalised, cut at the mean over the batch's rows (per frame and object).
  reference, reference_masks = public_pipeline(**clips, heads=np.tile(heads[:1], (2, 1)),
                                               num_iters=3)
  masks = np.asarray(found["masks"]).reshape(reference_masks.shape)
  np.testing.assert_array_equal(masks, reference_masks)
  assert 0.0 < reference_masks.mean() < 0.5
  error = np.linalg.norm(np.asarray(found["prototypes"]) - reference, axis=-1)
  assert (error / np.linalg.norm(reference, axis=-1)).max() < 1e-4
  # Per-clip heads (what "batch_mean" drew before) would cut otherwise.
  _, per_clip_masks = public_pipeline(**clips, heads=per_clip, num_iters=3)
  assert np.any(per_clip_masks != reference_masks)


def test_mean_threshold_keeps_drawing_heads_per_clip():
  teacher_out, _, clip_shape = _teacher_outputs(np.random.default_rng(12))
  key = jax.random.PRNGKey(3)
  found = objects.track_objects(objects.DoraOptions(num_objects=3), teacher_out, clip_shape, key)
  np.testing.assert_array_equal(np.asarray(found["heads"]),
                                np.asarray(tracking.choose_heads(key, 2, 6, 3)))
