"""LOST, CorLoc, the VOC reader and `dora-eval discover` on a tiny VOC folder."""
import json
import os

from flax import nnx
import numpy as np
from PIL import Image
import pytest

from dora_jax.cli import eval as eval_main
from dora_jax.evaluation import discover
from dora_jax.evaluation import voc
from dora_jax.models import vit
from dora_jax.pretrained import export

HEADS, HEAD_DIM = 2, 4


def _keys(features, rng):
  """Patch features (B, N, HEADS * HEAD_DIM) -> keys (B, HEADS, N+1, HEAD_DIM), a random [CLS]."""
  batch, num = features.shape[:2]
  patches = features.reshape(batch, num, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
  cls = rng.normal(size=(batch, HEADS, 1, HEAD_DIM))
  return np.concatenate([cls, patches], axis=2).astype(np.float32)


def test_lost_boxes_the_object_against_a_correlated_background():
  rng = np.random.default_rng(0)
  grid = (6, 8)
  background, obj = np.eye(8)[0], np.eye(8)[1] - 0.5 * np.eye(8)[0]
  features = np.tile(background, (2,) + grid + (1,))
  features[0, 2:4, 3:6] = obj  # Image 0: rows 2-3, columns 3-5.
  features[1, 0:3, 6:8] = obj  # Image 1: rows 0-2, columns 6-7 (the corner).
  features = features + rng.normal(0, 0.05, features.shape)
  features = features.reshape(2, -1, 8)
  keys = _keys(features, rng)
  np.testing.assert_allclose(discover.key_features(keys), features, rtol=1e-6)
  boxes = discover.lost(keys, grid)
  np.testing.assert_array_equal(boxes, [[3, 2, 6, 4], [6, 0, 8, 3]])


def _component(mask, start):
  """The 4-connected component of `start` in a boolean grid, by flood fill."""
  seen, stack = {start}, [start]
  while stack:
    row, col = stack.pop()
    for nxt in ((row + 1, col), (row - 1, col), (row, col + 1), (row, col - 1)):
      if (0 <= nxt[0] < mask.shape[0] and 0 <= nxt[1] < mask.shape[1] and mask[nxt]
          and nxt not in seen):
        seen.add(nxt)
        stack.append(nxt)
  return seen


def _lost_reference(features, grid, k_patches):
  """LOST in float64 with loops: degree, seed, expansion, flood-filled component, box."""
  similarity = features.astype(np.float64) @ features.astype(np.float64).T
  num = len(features)
  degree = [sum(similarity[i, j] > 0 for j in range(num) if j != i) for i in range(num)]
  order = sorted(range(num), key=lambda i: (degree[i], i))
  seed = order[0]
  expanded = [c for c in order[:k_patches] if similarity[seed, c] > 0]
  scores = sum(similarity[s] for s in expanded)
  cells = _component(scores.reshape(grid) > 0, divmod(seed, grid[1]))
  rows, cols = zip(*cells)
  return [min(cols), min(rows), max(cols) + 1, max(rows) + 1]


@pytest.mark.parametrize("k_patches", [4, 100])
def test_lost_equals_a_float64_reference(k_patches):
  rng = np.random.default_rng(1)
  grid = (5, 6)
  # A shared direction makes the positive graph dense, as in real keys; the rest is noise.
  features = rng.normal(size=(6, 30, HEADS * HEAD_DIM)) + 0.3
  boxes = discover.lost(_keys(features, rng), grid, k_patches=k_patches)
  expected = [_lost_reference(f, grid, k_patches) for f in features]
  np.testing.assert_array_equal(boxes, expected)


def test_box_to_pixels_clips_the_padding_and_scales_to_the_original():
  # Resized 20x30 (padded to 24x32 with 8-px patches), original 40x60: a factor of 2.
  box = discover.box_to_pixels(np.array([1, 0, 3, 2]), 8, (20, 30), (40, 60))
  np.testing.assert_allclose(box, [16, 0, 48, 32])
  box = discover.box_to_pixels(np.array([2, 1, 4, 3]), 8, (20, 30), (40, 60))
  np.testing.assert_allclose(box, [32, 16, 60, 40])  # x1 = 32 -> 30 px, y1 = 24 -> 20 px.
  assert discover.input_sizes(37, 45, short_side=0, patch_size=8) == ((37, 45), (40, 48))
  assert discover.input_sizes(40, 60, short_side=16, patch_size=8) == ((16, 24), (16, 24))


def test_iou_of_voc_boxes_is_the_iou_of_their_pixels():
  rng = np.random.default_rng(2)
  height, width = 30, 40

  def pixels(box):  # VOC: 1-based, both ends inclusive.
    mask = np.zeros((height, width), bool)
    mask[int(box[1]) - 1:int(box[3]), int(box[0]) - 1:int(box[2])] = True
    return mask

  for _ in range(50):
    boxes = []
    for _ in range(2):
      x = np.sort(rng.integers(1, width + 1, 2))
      y = np.sort(rng.integers(1, height + 1, 2))
      boxes.append([x[0], y[0], x[1], y[1]])
    a, b = pixels(boxes[0]), pixels(boxes[1])
    expected = np.sum(a & b) / np.sum(a | b)
    got = discover.box_iou(voc.voc_to_continuous(boxes[0]), voc.voc_to_continuous([boxes[1]]))
    assert got[0] == pytest.approx(expected)
  np.testing.assert_array_equal(voc.continuous_to_voc(voc.voc_to_continuous([[3, 4, 5, 6]])),
                                [[3, 4, 5, 6]])


def test_corloc():
  truths = [voc.voc_to_continuous(np.array(boxes, float)) for boxes in (
      [[1, 1, 10, 10]], [[1, 1, 10, 10]], [[1, 1, 10, 10], [21, 21, 30, 30]], [[1, 1, 10, 10]])]
  assert discover.corloc([t[0] for t in truths], truths) == 100.0
  shift = lambda box, dx: box + np.array([dx, 0, dx, 0])
  predictions = [
      shift(truths[0][0], 3),  # IoU 70 / 130 = 0.54: localised.
      shift(truths[1][0], 4),  # IoU 60 / 140 = 0.43: missed.
      shift(truths[2][1], 3),  # Localises the image's second object: counts.
      np.array([20.0, 20.0, 30.0, 30.0]),  # Elsewhere: missed.
  ]
  assert discover.box_iou(predictions[0], truths[0])[0] == pytest.approx(70 / 130)
  assert discover.corloc(predictions, truths) == 50.0


def _write_xml(path, width, height, objects):
  parts = [f"<annotation><filename>{os.path.basename(path)[:-4]}.jpg</filename>"
           f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
  for name, box, difficult, truncated in objects:
    parts.append(f"<object><name>{name}</name><truncated>{truncated}</truncated>"
                 f"<difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>"
                 f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>"
                 "</object>")
  with open(path, "w") as f:
    f.write("".join(parts) + "</annotation>")


def test_voc_annotation_keeps_every_object(tmp_path):
  path = str(tmp_path / "000001.xml")
  _write_xml(path, 500, 375, [("dog", (48, 240, 195, 371), 0, 1),
                              ("person", (8, 12, 352, 498.5), 1, 0)])
  image = voc.parse_annotation(path, "x.jpg")
  assert (image.image_id, image.width, image.height) == ("000001", 500, 375)
  np.testing.assert_array_equal(image.boxes, [[48, 240, 195, 371], [8, 12, 352, 498.5]])
  assert image.names == ("dog", "person")
  assert image.difficult == (False, True) and image.truncated == (True, False)


def test_draw_boxes_on_voc_pixels():
  image = np.zeros((20, 30, 3), np.uint8)
  picture = discover.draw_boxes(image, np.array([[2, 3, 10, 12]]), np.array([21, 1, 30, 20]))
  truth = np.all(picture == discover.TRUTH_COLOUR, axis=-1)
  prediction = np.all(picture == discover.PREDICTION_COLOUR, axis=-1)
  # VOC pixel (x, y) is array [y - 1, x - 1]: the outlines run along the boxes' first and last
  # pixels.
  assert truth[2, 1:10].all() and truth[11, 1:10].all() and truth[2:12, 1].all()
  assert not truth[1].any() and not truth[:, 10].any() and truth.sum() == 2 * 9 + 2 * 8
  assert prediction[0, 20:].all() and prediction[19, 20:].all() and prediction[:, 29].all()


# ---- dora-eval discover. ----

IMAGES = {"a": (40, 48, (9, 17, 24, 32)), "b": (48, 40, (5, 9, 28, 40)),
          "c": (37, 45, (20, 1, 45, 20))}  # id: (height, width, VOC box of the square).


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
  """A VOC folder of three images (grey, one coloured square each), two padded sizes."""
  root = tmp_path_factory.mktemp("VOC2007")
  for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
    os.makedirs(root / sub)
  rng = np.random.default_rng(3)
  for image_id, (height, width, box) in IMAGES.items():
    pixels = np.full((height, width, 3), 120.0) + rng.normal(0, 5, (height, width, 3))
    pixels[box[1] - 1:box[3], box[0] - 1:box[2]] = (200, 40, 30)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    _write_xml(str(root / "Annotations" / f"{image_id}.xml"), width, height,
               [("square", box, 0, 0)])
  (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(IMAGES) + "\n")
  return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An exported tiny random ViT (8-px patches)."""
  backbone = vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=32,
                                   rngs=nnx.Rngs(0))
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  export.save_exported(backbone, path, {"test": "random"})
  return path


def _main(args, capsys):
  code = eval_main.main(args + ["--no-progress"])
  out, err = capsys.readouterr()
  return code, out, err


def test_discover_end_to_end(voc_root, checkpoint, tmp_path, capsys):
  out = tmp_path / "discover"
  code, stdout, _ = _main(["discover", "--checkpoint", checkpoint, "--data", str(voc_root),
                           "--batch-size", "2", "--out", str(out)], capsys)
  assert code == 0 and stdout.startswith("LOST CorLoc ")
  report = json.loads((out / discover.REPORT_FILE).read_text())
  assert report["num_images"] == 3 and sorted(report["boxes"]) == sorted(IMAGES)
  hits = 0
  for image_id, (height, width, truth) in IMAGES.items():
    xmin, ymin, xmax, ymax = report["boxes"][image_id]
    assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height
    # Boxes start on the patch grid: x0 = xmin - 1 is a multiple of 8 at the original size.
    assert (xmin - 1) % 8 == 0 and (ymin - 1) % 8 == 0
    inter_w = max(0, min(xmax, truth[2]) - max(xmin, truth[0]) + 1)
    inter_h = max(0, min(ymax, truth[3]) - max(ymin, truth[1]) + 1)
    area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    inter = inter_w * inter_h
    hits += inter / (area((xmin, ymin, xmax, ymax)) + area(truth) - inter) >= 0.5
  assert report["CorLoc"] == pytest.approx(100 * hits / 3)
  assert report["num_localised"] == hits
  pictures = sorted(os.listdir(out / discover.PICTURES_DIR))
  assert pictures == [f"{image_id}.png" for image_id in sorted(IMAGES)]
  for image_id, (height, width, _) in IMAGES.items():
    picture = np.asarray(Image.open(out / discover.PICTURES_DIR / f"{image_id}.png"))
    assert picture.shape == (height, width, 3)

  # Resized to a shorter side of 16 px: boxes still in the original image's pixels.
  out16 = tmp_path / "discover16"
  code, _, _ = _main(["discover", "--checkpoint", checkpoint, "--data", str(voc_root),
                      "--short-side", "16", "--out", str(out16)], capsys)
  assert code == 0
  report = json.loads((out16 / discover.REPORT_FILE).read_text())
  for image_id, (height, width, _) in IMAGES.items():
    xmin, ymin, xmax, ymax = report["boxes"][image_id]
    assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height


def test_discover_bad_input_is_one_line_and_exit_2(voc_root, checkpoint, tmp_path, capsys):
  no_images = tmp_path / "no_images"
  os.makedirs(no_images / "Annotations")
  no_split = tmp_path / "no_split"
  for sub in ("JPEGImages", "Annotations"):
    os.makedirs(no_split / sub)
  unannotated = tmp_path / "unannotated"
  for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
    os.makedirs(unannotated / sub)
  (unannotated / "ImageSets" / "Main" / "trainval.txt").write_text("lonely\n")
  Image.new("RGB", (16, 16)).save(unannotated / "JPEGImages" / "lonely.jpg")
  out = tmp_path / "out"
  cases = [
      (["--data", str(no_images)], f"{no_images / 'JPEGImages'} does not exist"),
      (["--data", str(no_split)],
       f"split file {no_split / 'ImageSets' / 'Main' / 'trainval.txt'} does not exist"),
      (["--data", str(unannotated)],
       f"image 'lonely' of {unannotated / 'ImageSets' / 'Main' / 'trainval.txt'} has no "
       f"annotation {unannotated / 'Annotations' / 'lonely.xml'}"),
      (["--data", str(voc_root), "--short-side", "20"],
       "--short-side 20 must be 0 (original size) or a multiple of the checkpoint's patch size 8"),
  ]
  for args, message in cases:
    code, stdout, err = _main(["discover", "--checkpoint", checkpoint, "--out", str(out)] + args,
                              capsys)
    assert code == 2 and stdout == "", args
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("dora-eval discover: error: ")
  assert not out.exists()
