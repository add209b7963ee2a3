"""Clip views: boxes, clip-consistent global crop and flip, colour ops against references."""
import dataclasses
import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dora_jax.data import views

H, W, T = 48, 64, 4
NO_COLOUR = dict(color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=0.0,
                 local_blur_prob=0.0)
SMALL = views.ViewConfig(global_pre_size=40, global_size=32, local_size=16, num_local_crops=3)


def _jpeg(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _frames(count=T, seed=0):
  """Smooth, distinct frames (a gradient whose phase moves), as JPEG bytes."""
  y, x = np.mgrid[0:H, 0:W]
  frames = []
  for t in range(count):
    r = 128 + 100 * np.sin(x / 7 + t + seed)
    g = 128 + 100 * np.cos(y / 5 - t)
    b = 128 + 60 * np.sin((x + y) / 9)
    frames.append(_jpeg(np.stack([r, g, b], -1).astype(np.uint8)))
  return frames


def test_random_resized_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    left, top, w, h = views.random_resized_box(rng, W, H, (0.1, 0.5))
    assert 0 <= left and left + w <= W and 0 <= top and top + h <= H
    area = w * h / (W * H)
    assert 0.1 - 0.03 <= area <= 0.5 + 0.03  # Rounding to whole pixels.
    assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_global_views_share_box_and_flip_across_the_clip():
  config = dataclasses.replace(SMALL, **NO_COLOUR)
  jpegs = _frames()
  out = views.clip_views(jpegs, (H, W), np.random.default_rng(3), config, return_boxes=True)
  assert out["frames"].shape == (T, 32, 32, 3) and out["frames"].dtype == np.uint8
  assert out["crops"].shape == (T, 3, 16, 16, 3) and out["crops"].dtype == np.uint8
  assert np.all(out["global_boxes"] == out["global_boxes"][0, 0])  # One box for the clip...
  assert np.all(out["global_flips"] == out["global_flips"][0, 0])  # ...and one flip.
  left, top, w, h = out["global_boxes"][0, 0]
  pre_left, pre_top, pre_w, pre_h = out["pre_box"]
  assert pre_left <= left and left + w <= pre_left + pre_w + 1e-9
  assert pre_top <= top and top + h <= pre_top + pre_h + 1e-9
  for t, jpeg in enumerate(jpegs):  # Frame t's global view is frame t cut with the ONE box.
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    expected = np.asarray(image.resize((32, 32), Image.BILINEAR, box=(left, top, left + w, top + h)))
    if out["global_flips"][0, 0]:
      expected = expected[:, ::-1]
    np.testing.assert_array_equal(out["frames"][t], expected)
  boxes = out["local_boxes"]  # Local crops: inside the pre-crop, drawn per frame.
  assert np.all(boxes[..., 0] >= pre_left - 1e-9) and np.all(boxes[..., 1] >= pre_top - 1e-9)
  assert np.all(boxes[..., 0] + boxes[..., 2] <= pre_left + pre_w + 1e-9)
  assert np.all(boxes[..., 1] + boxes[..., 3] <= pre_top + pre_h + 1e-9)
  assert len({tuple(b) for b in boxes.reshape(-1, 4)}) == T * 3

  # Identical frames: identical global views (same box and flip), not identical local crops.
  same = views.clip_views([jpegs[0]] * T, (H, W), np.random.default_rng(5), config)
  assert all(np.array_equal(same["frames"][0], same["frames"][t]) for t in range(T))
  assert not np.array_equal(same["crops"][0], same["crops"][1])


def test_flip_mirrors_every_global_view_and_local_flips_have_their_own_key():
  jpegs = _frames()
  never = views.clip_views(jpegs, (H, W), np.random.default_rng(7),
                           dataclasses.replace(SMALL, flip_prob=0.0, **NO_COLOUR))
  always = views.clip_views(jpegs, (H, W), np.random.default_rng(7),
                            dataclasses.replace(SMALL, flip_prob=1.0, **NO_COLOUR))
  np.testing.assert_array_equal(always["frames"], never["frames"][:, :, ::-1])
  np.testing.assert_array_equal(always["crops"], never["crops"])  # local_flip_prob 0: none.
  local = views.clip_views(jpegs, (H, W), np.random.default_rng(7),
                           dataclasses.replace(SMALL, flip_prob=0.0, local_flip_prob=1.0,
                                               **NO_COLOUR))
  np.testing.assert_array_equal(local["crops"], never["crops"][:, :, :, ::-1])
  np.testing.assert_array_equal(local["frames"], never["frames"])


def test_same_rng_same_views_other_rng_other_views():
  jpegs = _frames()
  a = views.clip_views(jpegs, (H, W), np.random.default_rng(11), SMALL)
  b = views.clip_views(jpegs, (H, W), np.random.default_rng(11), SMALL)
  c = views.clip_views(jpegs, (H, W), np.random.default_rng(12), SMALL)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["frames"], c["frames"])


def _luma(x):
  return x @ np.array([0.299, 0.587, 0.114])


def test_jitter_affines_equal_the_ops_applied_one_by_one_in_float64():
  rng = np.random.default_rng(0)
  pixels = rng.uniform(60, 190, size=(500, 3))
  factors = np.stack([rng.uniform(0.6, 1.4, 20), rng.uniform(0.6, 1.4, 20),
                      rng.uniform(0.8, 1.2, 20), rng.uniform(-0.1, 0.1, 20)], -1)
  orders = np.stack([rng.permutation(4) for _ in range(20)])
  matrices, offsets = views.jitter_affines(factors, orders, np.tile(pixels.mean(0), (20, 1)))
  for view in range(20):  # One batched call; each view checked on its own.
    expected = pixels.copy()
    for op in orders[view]:  # Independent: op by op on the pixels, means recomputed on the fly.
      f = factors[view, op]
      if op == 0:
        expected = expected * f
      elif op == 1:
        expected = f * expected + (1 - f) * _luma(expected).mean()
      elif op == 2:
        expected = f * expected + (1 - f) * _luma(expected)[:, None]
      else:  # Hue: keeps luma and chroma magnitude, turns chroma by 2 pi h in YIQ.
        yiq = expected @ views._RGB_TO_YIQ.T
        angle = 2 * np.pi * f
        i = yiq[:, 1] * np.cos(angle) - yiq[:, 2] * np.sin(angle)
        q = yiq[:, 1] * np.sin(angle) + yiq[:, 2] * np.cos(angle)
        expected = np.stack([yiq[:, 0], i, q], -1) @ np.linalg.inv(views._RGB_TO_YIQ).T
    np.testing.assert_allclose(pixels @ matrices[view].T + offsets[view], expected, atol=1e-9)


def test_brightness_contrast_saturation_match_pil_enhance():
  rng = np.random.default_rng(1)
  array = rng.integers(70, 180, size=(32, 32, 3), dtype=np.uint8)
  image = Image.fromarray(array)
  mean = np.asarray(image, np.float64).reshape(-1, 3).mean(0)
  for op, enhance in ((0, ImageEnhance.Brightness), (1, ImageEnhance.Contrast),
                      (2, ImageEnhance.Color)):
    factors = np.array([[1.0, 1.0, 1.0, 0.0]])
    factors[0, op] = 1.25
    order = np.array([[op] + [o for o in range(4) if o != op]])
    matrix, offset = views.jitter_affines(factors, order, mean[None])
    affine = tuple(np.concatenate([matrix[0], offset[0, :, None]], 1).reshape(-1))
    ours = np.asarray(image.convert("RGB", affine), np.int32)
    theirs = np.asarray(enhance(image).enhance(1.25), np.int32)
    assert np.abs(ours - theirs).max() <= 2, op  # PIL rounds the luma mean and the L image.


def test_grayscale_probability_one_gives_gray_views():
  config = dataclasses.replace(SMALL, color_jitter_prob=0.0, grayscale_prob=1.0)
  out = views.clip_views(_frames(), (H, W), np.random.default_rng(0), config)
  for key in ("frames", "crops"):
    assert np.abs(out[key][..., 0].astype(int) - out[key][..., 2]).max() <= 1


def test_draft_decoding_of_large_frames_keeps_the_view_close():
  big = np.asarray(Image.open(io.BytesIO(_frames(1)[0])).resize((W * 8, H * 8), Image.BICUBIC))
  jpeg = _jpeg(big)
  config = dataclasses.replace(views.ViewConfig(global_pre_size=64, global_size=16,
                                                num_local_crops=0), **NO_COLOUR)
  out = views.clip_views([jpeg], (H * 8, W * 8), np.random.default_rng(2), config,
                         return_boxes=True)
  left, top, w, h = out["global_boxes"][0, 0]
  assert min(w, h) / 16 >= 2  # The JPEG was decoded at reduced scale...
  full = Image.open(io.BytesIO(jpeg)).convert("RGB")
  expected = np.asarray(full.resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h)))
  if out["global_flips"][0, 0]:
    expected = expected[:, ::-1]
  assert np.abs(out["frames"][0].astype(int) - expected).mean() < 4  # ...to nearly the same view.


def test_blurred_grayscale_views_equal_the_rgb_op_by_op_path():
  # Grayscale views take a one-channel path (luma, blur, broadcast); it must give exactly what
  # the plain path gives: the RGB resize, PIL's RGB luma matrix, PIL's RGB Gaussian blur, flip.
  config = dataclasses.replace(SMALL, color_jitter_prob=0.0, grayscale_prob=1.0,
                               global_blur_prob=1.0, local_blur_prob=1.0, blur_sigma=(1.5, 1.5))
  jpegs = _frames()
  out = views.clip_views(jpegs, (H, W), np.random.default_rng(4), config, return_boxes=True)
  gray = tuple(views._TO_GRAY.reshape(-1)[[0, 1, 2]].tolist() + [0.0]) * 3

  def expected(image, box, size, flip):
    left, top, w, h = box
    view = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    view = view.convert("RGB", gray).filter(ImageFilter.GaussianBlur(radius=1.5))
    return np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view)

  for t, jpeg in enumerate(jpegs):
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    np.testing.assert_array_equal(
        out["frames"][t], expected(image, out["global_boxes"][t, 0], 32, out["global_flips"][t, 0]))
    for m in range(3):
      np.testing.assert_array_equal(
          out["crops"][t, m],
          expected(image, out["local_boxes"][t, m], 16, out["local_flips"][t, m]))


DINO = dataclasses.replace(SMALL, global_pre_size=0, global_crops_per_frame=2, **NO_COLOUR)


def test_dino_views_two_independent_global_crops_of_the_whole_frame():
  jpegs = _frames()
  out = views.clip_views(jpegs, (H, W), np.random.default_rng(8),
                         dataclasses.replace(DINO, second_global_solarize_prob=0.0),
                         return_boxes=True)
  assert out["frames"].shape == out["second_frames"].shape == (T, 32, 32, 3)
  assert out["crops"].shape == (T, 3, 16, 16, 3)
  boxes = out["global_boxes"]  # (T, 2, 4): every crop its own box, in the whole frame.
  assert boxes.shape == (T, 2, 4) and len({tuple(b) for b in boxes.reshape(-1, 4)}) == 2 * T
  for box in np.concatenate([boxes.reshape(-1, 4), out["local_boxes"].reshape(-1, 4)]):
    assert box[0] >= 0 and box[1] >= 0 and box[0] + box[2] <= W and box[1] + box[3] <= H
  areas = boxes[..., 2] * boxes[..., 3] / (W * H)
  assert np.all(areas >= 0.4 - 0.05)  # data.global_scale of the frame, not of a pre-crop.
  for t, jpeg in enumerate(jpegs):  # Each global crop is its frame cut with its own box.
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    for g, key in enumerate(("frames", "second_frames")):
      left, top, w, h = boxes[t, g]
      expected = np.asarray(image.resize((32, 32), Image.BILINEAR,
                                         box=(left, top, left + w, top + h)))
      if out["global_flips"][t, g]:
        expected = expected[:, ::-1]
      np.testing.assert_array_equal(out[key][t], expected)
  assert not np.array_equal(out["frames"], out["second_frames"])
  flips = views.clip_views(jpegs * 8, (H, W), np.random.default_rng(9), DINO,
                           return_boxes=True)["global_flips"]
  assert flips.any() and not flips.all()  # Drawn per crop, not once per clip.


def test_dino_second_global_crop_is_solarised_and_only_it():
  jpegs = _frames()
  plain = views.clip_views(jpegs, (H, W), np.random.default_rng(10),
                           dataclasses.replace(DINO, second_global_solarize_prob=0.0))
  solar = views.clip_views(jpegs, (H, W), np.random.default_rng(10),
                           dataclasses.replace(DINO, second_global_solarize_prob=1.0))
  np.testing.assert_array_equal(solar["frames"], plain["frames"])
  np.testing.assert_array_equal(solar["crops"], plain["crops"])
  # PIL's solarize (DINO's): every level >= 128 inverted, the others kept.
  expected = np.where(plain["second_frames"] >= 128, 255 - plain["second_frames"],
                      plain["second_frames"])
  np.testing.assert_array_equal(solar["second_frames"], expected)
  assert np.any(plain["second_frames"] >= 128)


def test_dino_blur_probabilities_apply_per_global_crop():
  jpegs = _frames()
  sharp = views.clip_views(jpegs, (H, W), np.random.default_rng(11), DINO)
  first = views.clip_views(jpegs, (H, W), np.random.default_rng(11),
                           dataclasses.replace(DINO, global_blur_prob=1.0))
  second = views.clip_views(jpegs, (H, W), np.random.default_rng(11),
                            dataclasses.replace(DINO, second_global_blur_prob=1.0))
  np.testing.assert_array_equal(first["second_frames"], sharp["second_frames"])
  np.testing.assert_array_equal(second["frames"], sharp["frames"])
  for blurred, key in ((first, "frames"), (second, "second_frames")):
    assert not np.array_equal(blurred[key], sharp[key])
    # Blur lowers the local contrast: smaller differences between neighbouring pixels.
    step = lambda x: np.abs(np.diff(x.astype(int), axis=2)).mean()
    assert step(blurred[key]) < step(sharp[key])
