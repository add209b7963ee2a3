r"""The view primitives, OpenCV (what views.py uses) against Pillow (what it used): time and output.

  python benchmarks/view_primitives.py [--video /tmp/dora_bench/tour640.mp4] \
      [--old_views /tmp/views_pil.py]

Times each primitive both ways side by side in one process (median of 5 repeats; the CPU seconds
of the process, robust to other load), then measures how far OpenCV's output is from Pillow's,
in uint8 levels, on real photos (scikit-image's bundled astronaut, coffee, chelsea, rocket) and,
when --video exists (input_pipeline.py makes it), frames of the synthetic walking tour:
  resize  views.resize_box against PIL's antialiased BILINEAR resize of the same float box, on
          boxes drawn as the paper's global (224 px) and local (112 px) views; both also against
          that filter computed in float64 (a triangle of half-width max(s, 1), s = box / output);
  blur    views.gaussian_blur against PIL's GaussianBlur(radius=sigma), sigma ~ U(0.1, 2);
  decode  cv2.imdecode against PIL's decode of the same JPEG;
  colour  cv2.transform against PIL's convert("RGB", matrix) with the same affine map;
With --old_views (a copy of the Pillow views.py, e.g. `git show 8d7bf5f:dora_jax/data/views.py`)
also whole clips of the tour: both views.py from the same rng (same boxes, flips and draws).
Not a test: record the numbers in BENCHMARKS.md with the machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time

import cv2
import numpy as np
from PIL import Image, ImageFilter
import skimage.data

from dora_jax.data import views


def cpu_ms(fn, calls: int) -> float:
  """Median over 5 repeats of the CPU milliseconds of one call."""
  times = []
  for _ in range(5):
    start = time.process_time()
    for _ in range(calls):
      fn()
    times.append((time.process_time() - start) / calls)
  return statistics.median(times) * 1e3


def pil_resize(image: np.ndarray, box, size: int) -> np.ndarray:
  left, top, w, h = box
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR,
                                                  box=(left, top, left + w, top + h)))


def triangle_resize(image: np.ndarray, box, size: int) -> np.ndarray:
  """Antialiased bilinear in float64: per axis, output j weights input pixel x by a triangle of
  half-width max(s, 1) around box_start + (j + 0.5) s (pixel centres), normalised."""
  out = image.astype(np.float64)
  for axis, start, length in ((1, box[0], box[2]), (0, box[1], box[3])):
    scale = length / size
    centres = start + (np.arange(size) + 0.5) * scale
    weights = np.maximum(0, 1 - np.abs(np.arange(out.shape[axis]) + 0.5 - centres[:, None])
                         / max(scale, 1.0))
    weights /= weights.sum(1, keepdims=True)
    out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
  return out


def sample_images(video: str) -> dict[str, np.ndarray]:
  images = {name: getattr(skimage.data, name)()
            for name in ("astronaut", "coffee", "chelsea", "rocket")}
  if os.path.exists(video):
    import av  # pylint: disable=g-import-not-at-top
    with av.open(video) as container:
      for index, frame in enumerate(container.decode(video=0)):
        if index % 150 == 0:
          images[f"tour{index}"] = frame.to_ndarray(format="rgb24")
        if index >= 600:
          break
  return images


def summary(diffs: list[np.ndarray]) -> dict[str, float]:
  flat = np.concatenate([d.reshape(-1) for d in diffs])
  return {"mean_abs": round(float(flat.mean()), 3), "max_abs": round(float(flat.max()), 1),
          "p99_9_abs": round(float(np.percentile(flat, 99.9)), 1),
          "frac_over_2": round(float((flat > 2).mean()), 4)}


def timings(image: np.ndarray) -> dict[str, float]:
  """PIL and OpenCV ms per call of each primitive on one 640x360 frame and its views."""
  out = {}
  jpeg_buffer = io.BytesIO()
  Image.fromarray(image).save(jpeg_buffer, format="JPEG", quality=90)
  jpeg = jpeg_buffer.getvalue()

  def pil_decode(scale):
    picture = Image.open(io.BytesIO(jpeg), formats=("JPEG",))
    if scale > 1:
      picture.draft("RGB", (picture.width // scale, picture.height // scale))
    picture.load()
    return picture

  for scale in (1, 2):
    out[f"decode 1/{scale}"] = (cpu_ms(lambda: pil_decode(scale), 30),
                                cpu_ms(lambda: views._decode(jpeg, image.shape[:2], scale), 30))
  picture = Image.fromarray(image)
  for name, box, size in (("resize 224, downscale 1.3x", (100.3, 50.7, 291.2, 270.1), 224),
                          ("resize 112, downscale 1.4x", (200.2, 100.6, 160.3, 150.9), 112),
                          ("resize 112, upscale 0.8x", (200.2, 100.6, 90.3, 85.9), 112)):
    left, top, w, h = box
    out[name] = (cpu_ms(lambda: picture.resize((size, size), Image.BILINEAR,
                                               box=(left, top, left + w, top + h)), 200),
                 cpu_ms(lambda: views.resize_box(image, box, size), 200))
  affine = np.array([[1.1, 0.1, 0.0, 3], [0.05, 0.9, 0.1, -2], [0, 0.2, 0.8, 1]], np.float32)
  matrix = tuple(affine.reshape(-1).tolist())
  for size in (224, 112):
    view = np.ascontiguousarray(image[:size, :size])
    view_picture = Image.fromarray(view)
    for sigma in (0.5, 2.0):
      out[f"blur {size} RGB sigma {sigma}"] = (
          cpu_ms(lambda: view_picture.filter(ImageFilter.GaussianBlur(radius=sigma)), 100),
          cpu_ms(lambda: views.gaussian_blur(view, sigma), 100))
    out[f"colour matrix {size}"] = (cpu_ms(lambda: view_picture.convert("RGB", matrix), 200),
                                    cpu_ms(lambda: cv2.transform(view, affine), 200))
    out[f"mean colour {size}"] = (
        cpu_ms(lambda: view_picture.reduce(view_picture.size).getpixel((0, 0)), 200),
        cpu_ms(lambda: cv2.mean(view), 200))
    out[f"flip {size} (to numpy)"] = (
        cpu_ms(lambda: np.asarray(view_picture.transpose(Image.FLIP_LEFT_RIGHT)), 200),
        cpu_ms(lambda: cv2.flip(view, 1), 200))
  return {name: {"pil_ms": round(a, 4), "opencv_ms": round(b, 4), "speedup": round(a / b, 1)}
          for name, (a, b) in out.items()}


def differences(images: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  rng = np.random.default_rng(0)
  config = views.ViewConfig()
  resize = {key: [] for key in ("global_vs_pil", "local_vs_pil", "opencv_vs_float64",
                                "pil_vs_float64", "downscaled_vs_pil", "upscaled_vs_pil")}
  blur, decode, colour = [], [], []
  for image in images.values():
    height, width = image.shape[:2]
    for index in range(40):
      pre = views.random_resized_box(rng, width, height, config.global_pre_scale)
      is_global = index % 4 == 0
      scale, size = ((config.global_scale, config.global_size) if is_global else
                     (config.local_scale, config.local_size))
      box = views.compose_box(pre, config.global_pre_size,
                              views.random_resized_box(rng, config.global_pre_size,
                                                       config.global_pre_size, scale))
      ours, theirs = views.resize_box(image, box, size), pil_resize(image, box, size)
      diff = np.abs(ours.astype(np.int16) - theirs)
      resize["global_vs_pil" if is_global else "local_vs_pil"].append(diff)
      resize["downscaled_vs_pil" if max(box[2], box[3]) > size else "upscaled_vs_pil"].append(diff)
      exact = triangle_resize(image, box, size)
      resize["opencv_vs_float64"].append(np.abs(ours - exact))
      resize["pil_vs_float64"].append(np.abs(theirs - exact))
      sigma = rng.uniform(*config.blur_sigma)
      blur.append(np.abs(views.gaussian_blur(theirs, sigma).astype(np.int16) - np.asarray(
          Image.fromarray(theirs).filter(ImageFilter.GaussianBlur(radius=sigma)))))
      affine = views.color_affines(
          {"jitter": np.array([True]), "gray": np.array([index % 5 == 0]),
           "factors": np.array([[rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4),
                                 rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)]]),
           "orders": rng.permutation(4)[None]},
          np.asarray(cv2.mean(theirs)[:3])[None])[0]
      colour.append(np.abs(cv2.transform(theirs, affine.astype(np.float32)).astype(np.int16)
                           - np.asarray(Image.fromarray(theirs).convert(
                               "RGB", tuple(affine.reshape(-1).tolist())))))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    decoded = views._decode(buffer.getvalue(), image.shape[:2], 1.0)[0]
    decode.append(np.abs(decoded.astype(np.int16) - np.asarray(Image.open(buffer).convert("RGB"))))
  out = {f"resize_{key}": summary(value) for key, value in resize.items()}
  out.update(blur_vs_pil=summary(blur), decode_vs_pil=summary(decode),
             colour_matrix_vs_pil=summary(colour))
  return out


def whole_clips(old_views_path: str, video: str) -> dict[str, dict[str, float]]:
  """The paper's views of 10 clips of the tour (JPEG-encoded as dora-convert stores them) by
  this views.py and by `old_views_path`, from the same rng."""
  spec = importlib.util.spec_from_file_location("old_views", old_views_path)
  old_views = importlib.util.module_from_spec(spec)
  sys.modules["old_views"] = old_views  # dataclasses looks its module up.
  spec.loader.exec_module(old_views)
  frames = []
  import av  # pylint: disable=g-import-not-at-top
  with av.open(video) as container:
    for index, frame in enumerate(container.decode(video=0)):
      if index % 30 == 0:
        buffer = io.BytesIO()
        frame.to_image().save(buffer, format="JPEG", quality=90)
        frames.append(buffer.getvalue())
  config = views.ViewConfig()
  height, width = frame.height, frame.width
  diffs = {"frames": [], "crops": []}
  new_ms, old_ms = [], []
  for clip in range(10):
    jpegs = frames[clip:clip + 8]
    start = time.process_time()
    ours = views.clip_views(jpegs, (height, width), np.random.default_rng(clip), config)
    new_ms.append(time.process_time() - start)
    start = time.process_time()
    theirs = old_views.clip_views(jpegs, (height, width), np.random.default_rng(clip), config)
    old_ms.append(time.process_time() - start)
    for key in diffs:
      diffs[key].append(np.abs(ours[key].astype(np.int16) - theirs[key]))
  out = {f"clip_{key}_vs_old": summary(value) for key, value in diffs.items()}
  out["clip_cpu_ms"] = {"old": round(statistics.median(old_ms) * 1e3, 1),
                        "new": round(statistics.median(new_ms) * 1e3, 1)}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--video", default="/tmp/dora_bench/tour640.mp4",
                      help="The synthetic tour (made by input_pipeline.py); skipped if absent.")
  parser.add_argument("--old_views", default="", help="A copy of the Pillow views.py.")
  args = parser.parse_args()
  images = sample_images(args.video)
  frame = images.get("tour150", np.ascontiguousarray(
      cv2.resize(images["coffee"], (640, 360), interpolation=cv2.INTER_AREA)))
  result = {
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"load average {os.getloadavg()[0]:.1f}, OpenCV {cv2.__version__}, "
                 f"Pillow {Image.__version__}",
      "images": ", ".join(f"{name} {image.shape[1]}x{image.shape[0]}"
                          for name, image in images.items()),
      "timings": timings(frame),
      "differences_uint8": differences(images),
  }
  if args.old_views:
    result["differences_uint8"].update(whole_clips(args.old_views, args.video))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
