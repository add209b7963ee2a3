"""DoRA's view construction: the options parsed once, the views from a teacher's outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax import config_base
from dora_jax import objects


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
