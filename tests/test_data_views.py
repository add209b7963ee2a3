"""Clip views: boxes, clip-consistent global crop and flip, colour ops against references; the
OpenCV primitives (resize, blur, decode) against NumPy float64 references and Pillow."""
import dataclasses
import pickle
import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from dora_jax import config_base
from dora_jax.data import views

H, W, T = 48, 64, 4
NO_COLOUR = dict(color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=0.0,
                 local_blur_prob=0.0)
SMALL = views.ViewConfig(global_pre_size=40, global_size=32, local_size=16, num_local_crops=3)


def _jpeg(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _decoded(jpeg):
  """A frame as PIL decodes it (an independent decoder; views.py decodes with OpenCV)."""
  return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


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


def _triangle_resize_reference(image, box, size):
  """Antialiased bilinear (PIL's BILINEAR with a float box) in float64: along each axis, output j
  weights input pixel x by a triangle of half-width max(s, 1) (s = box side / size) centred on
  box_start + (j + 0.5) s, with x at its pixel centre x + 0.5; weights normalised."""
  out = image.astype(np.float64)
  for axis, start, length in ((1, box[0], box[2]), (0, box[1], box[3])):
    scale = length / size
    centres = start + (np.arange(size) + 0.5) * scale
    weights = np.maximum(0, 1 - np.abs(np.arange(out.shape[axis]) + 0.5 - centres[:, None])
                         / max(scale, 1.0))
    weights /= weights.sum(1, keepdims=True)
    out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
  return out


def _gaussian_blur_reference(image, sigma):
  """Separable Gaussian in float64, cut at ceil(3 sigma), edges repeated; (h, w) or (h, w, C)."""
  radius = math.ceil(3 * sigma)
  kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma * sigma))
  kernel /= kernel.sum()
  out = image.astype(np.float64)
  for axis in (0, 1):
    padding = [(0, 0)] * out.ndim
    padding[axis] = (radius, radius)
    padded = np.pad(out, padding, mode="edge")
    out = sum(weight * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis)
              for i, weight in enumerate(kernel))
  return out


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
    expected = views.resize_box(_decoded(jpeg), (left, top, w, h), 32)
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
    affine = np.concatenate([matrix[0], offset[0, :, None]], 1).astype(np.float32)
    ours = cv2.transform(array, affine).astype(np.int32)  # As clip_views applies it.
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


def test_blurred_grayscale_views_are_the_blurred_luma_of_the_resized_view():
  # Grayscale then blur, against the same steps in NumPy float64 from the same resized view:
  # luma (ITU-R 601) in every channel, a Gaussian of sigma 1.5, then the flip.
  config = dataclasses.replace(SMALL, color_jitter_prob=0.0, grayscale_prob=1.0,
                               global_blur_prob=1.0, local_blur_prob=1.0, blur_sigma=(1.5, 1.5))
  jpegs = _frames()
  out = views.clip_views(jpegs, (H, W), np.random.default_rng(4), config, return_boxes=True)

  def expected(image, box, size, flip):
    gray = _gaussian_blur_reference(_luma(views.resize_box(image, box, size)), 1.5)
    return np.repeat(gray[:, ::-1] if flip else gray, 3).reshape(size, size, 3)

  for t, jpeg in enumerate(jpegs):
    image = _decoded(jpeg)
    cases = [(out["frames"][t], out["global_boxes"][t, 0], 32, out["global_flips"][t, 0])] + [
        (out["crops"][t, m], out["local_boxes"][t, m], 16, out["local_flips"][t, m])
        for m in range(3)]
    for view, box, size, flip in cases:
      assert np.all(view == view[..., :1])  # Gray: three equal channels.
      # Rounding of the luma to uint8 before the blur, and OpenCV's fixed-point kernel.
      assert np.abs(view - expected(image, box, size, flip)).max() <= 1.5


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
    image = _decoded(jpeg)
    for g, key in enumerate(("frames", "second_frames")):
      expected = views.resize_box(image, tuple(boxes[t, g]), 32)
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


def test_decode_matches_pil_and_reduced_decode_is_the_frame_at_half_size():
  big = np.asarray(Image.fromarray(_decoded(_frames(1)[0])).resize((W * 4, H * 4), Image.BICUBIC))
  jpeg = _jpeg(big)
  image, factor = views._decode(jpeg, (H * 4, W * 4), 1.0)
  assert factor == 1.0 and image.dtype == np.uint8
  # Both are libjpeg-turbo with the same defaults: the same pixels (bit-identical with this
  # machine's wheels; 1 level allowed for other builds of either).
  assert np.abs(image.astype(int) - _decoded(jpeg)).max() <= 1
  half, factor = views._decode(jpeg, (H * 4, W * 4), 3.9)  # 1/2 is the most that 3.9 allows.
  assert half.shape == (H * 2, W * 2, 3) and factor == 2.0
  pooled = image.reshape(H * 2, 2, W * 2, 2, 3).mean((1, 3))  # 2x2 means of the full decode.
  assert np.abs(half - pooled).mean() < 1.5  # DCT scaling: nearly the 2x2 means.
  with pytest.raises(ValueError, match="not a JPEG"):
    views._decode(b"not a jpeg at all", (H, W), 1.0)


def test_resize_box_upscaling_is_bilinear_at_pixel_centres():
  image = _decoded(_frames(1)[0])
  rng = np.random.default_rng(0)
  for _ in range(30):  # Float boxes smaller than the 32-px output, anywhere in the frame.
    w, h = rng.uniform(6, 31), rng.uniform(6, 31)
    box = (rng.uniform(0, W - w), rng.uniform(0, H - h), w, h)
    ours = views.resize_box(image, box, 32)
    assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
    # Rounding to uint8 and OpenCV's 1/32-px coordinates.
    assert np.abs(ours - _triangle_resize_reference(image, box, 32)).max() <= 1


def test_resize_box_downscaling_is_near_pil_filter_and_antialiased():
  image = _decoded(_frames(1)[0])
  rng = np.random.default_rng(1)
  for _ in range(30):  # Boxes 1.05-2.8x the 16-px output.
    w, h = rng.uniform(17, 45), rng.uniform(17, 45)
    box = (rng.uniform(0, W - w), rng.uniform(0, H - h), w, h)
    diff = np.abs(views.resize_box(image, box, 16) - _triangle_resize_reference(image, box, 16))
    # A Gaussian prefilter plus bilinear, not PIL's triangle: as blurred on average, not equal
    # (0.49 mean, 2.4 max on these smooth frames; on photos, 0.35 mean levels, see BENCHMARKS.md).
    assert diff.mean() < 0.75 and diff.max() <= 4
  # Stripes of period 2.2 px, downscaled 4.5x: far above the output's Nyquist frequency, so an
  # antialiased resize gives a flat grey (PIL's: std 1.2 levels); plain bilinear sampling of the
  # same points gives a strong false pattern instead.
  x = np.arange(200)
  stripes = np.broadcast_to((128 + 100 * np.sin(2 * np.pi * x / 2.2))[None, :, None],
                            (100, 200, 3)).astype(np.uint8)
  box = (3.3, 2.1, 180.4, 90.2)
  ours = views.resize_box(stripes, box, 40).astype(np.float64)
  scale_x, scale_y = box[2] / 40, box[3] / 40
  sampled = cv2.warpAffine(stripes, np.array([[scale_x, 0, box[0] + 0.5 * scale_x - 0.5],
                                              [0, scale_y, box[1] + 0.5 * scale_y - 0.5]]),
                           (40, 40), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
  assert _triangle_resize_reference(stripes, box, 40).std() < 3
  assert ours.std() < 3 and abs(ours.mean() - stripes.mean()) < 2
  assert sampled.std() > 20


def test_gaussian_blur_is_a_gaussian_of_sigma_pixels():
  image = _decoded(_frames(1)[0])
  for sigma in (0.1, 0.5, 1.0, 2.0):
    ours = views.gaussian_blur(image, sigma)
    # OpenCV's fixed-point kernel and rounding to uint8.
    assert np.abs(ours - _gaussian_blur_reference(image, sigma)).max() <= 1, sigma
    # PIL's GaussianBlur (DINO's) approximates the Gaussian with box blurs: close, not equal.
    pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
    assert np.abs(ours.astype(int) - pil).mean() < 1, sigma
  np.testing.assert_array_equal(views.gaussian_blur(image, 0.1), image)  # Weights e^-50: none.
  # Mass kept and spread by sigma^2: a 9-px square (variance (9^2 - 1) / 12 per axis) blurred.
  square = np.zeros((41, 41), np.uint8)
  square[16:25, 16:25] = 200
  spread = views.gaussian_blur(square, 2.0).astype(np.float64)
  assert abs(spread.sum() - square.sum()) < 0.005 * square.sum()
  variance = (spread.sum(0) * (np.arange(41) - 20) ** 2).sum() / spread.sum()
  assert abs(variance - (80 / 12 + 4.0)) < 0.2


def test_view_config_is_config_bases_data_section():
  """Built from config_base's `data` keys: its defaults and types are theirs; values from a config
  are typed like them; it pickles (grain's workers get it by pickle)."""
  base = config_base.get_base_config().data
  assert {f.name: f.default for f in dataclasses.fields(views.ViewConfig)} == {
      key: base[key] for key in views.VIEW_KEYS}
  config = views.ViewConfig.from_config(dict(base.to_dict(), global_size=96.0, blur_sigma=[1, 3],
                                             flip_prob=1))
  assert (config.global_size, config.blur_sigma, config.flip_prob) == (96, (1.0, 3.0), 1.0)
  assert isinstance(config.global_size, int) and isinstance(config.flip_prob, float)
  assert pickle.loads(pickle.dumps(config)) == config
