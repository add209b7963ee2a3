"""The ADE20K and PASCAL VOC writers: labels read back equal the masks, boxes their extents."""
import os
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from dora_jax.data import eval_sets
from dora_jax.evaluation import seg_data


def _masks():
  """Two frames of 12 x 16: object 1 (class 2) a rectangle, object 2 (class 0) a single pixel in
  frame 0 and gone in frame 1; a third frame without objects."""
  masks = np.zeros((3, 12, 16), np.uint8)
  masks[0, 2:5, 3:9] = 1
  masks[0, 10, 15] = 2
  masks[1, 6:12, 0:4] = 1
  frames = np.random.default_rng(0).integers(0, 256, (3, 12, 16, 3)).astype(np.uint8)
  return frames, masks, np.array([2, 0])


def test_ade20k_layout_labels_read_back(tmp_path):
  frames, masks, classes = _masks()
  names = eval_sets.write_ade20k_layout(frames, masks, classes, str(tmp_path), "validation",
                                        class_names=["car", "dog", "tree"], prefix="t1_")
  assert names == ["t1_00000", "t1_00001", "t1_00002"]
  for name, mask in zip(names, masks):
    labels = np.asarray(Image.open(tmp_path / "annotations" / "validation" / f"{name}.png"))
    expected = np.where(mask == 1, 2 + 2, np.where(mask == 2, 2 + 0, 1))
    np.testing.assert_array_equal(labels, expected)
    assert Image.open(tmp_path / "images" / "validation" / f"{name}.jpg").size == (16, 12)
  # As the readout reads it: background class 0, "tree" class 3, names from class_names.txt.
  os.makedirs(tmp_path / "images" / "training")
  source = seg_data.ADE20KFolder(str(tmp_path), "validation")
  assert source.num_classes == 4 and source.class_names == ["background", "car", "dog", "tree"]
  np.testing.assert_array_equal(source[0][1][3, 4], 3)


def test_voc_layout_boxes_are_mask_extents(tmp_path):
  frames, masks, classes = _masks()
  names = eval_sets.write_voc_layout(frames, masks, classes, ["car", "dog", "tree"],
                                     str(tmp_path), prefix="t1_", min_area=2)
  assert names == ["t1_00000", "t1_00001"]  # Frame 2 has no object.
  eval_sets.write_voc_layout(frames[:1], masks[:1], classes, ["car", "dog", "tree"],
                             str(tmp_path), prefix="t2_", min_area=1)
  with open(tmp_path / "ImageSets" / "Main" / "trainval.txt") as f:
    assert f.read().split() == ["t1_00000", "t1_00001", "t2_00000"]

  def objects(name):
    root = ElementTree.parse(tmp_path / "Annotations" / f"{name}.xml").getroot()
    assert root.find("size/width").text == "16" and root.find("size/height").text == "12"
    return [(o.find("name").text, tuple(int(o.find(f"bndbox/{k}").text)
                                        for k in ("xmin", "ymin", "xmax", "ymax")))
            for o in root.findall("object")]

  # 1-based inclusive: rows 2..4 and columns 3..8 -> ymin 3, ymax 5, xmin 4, xmax 9.
  assert objects("t1_00000") == [("tree", (4, 3, 9, 5))]  # The 1-pixel dog is under min_area.
  assert objects("t1_00001") == [("tree", (1, 7, 4, 12))]
  assert objects("t2_00000") == [("tree", (4, 3, 9, 5)), ("car", (16, 11, 16, 11))]
  assert Image.open(tmp_path / "JPEGImages" / "t1_00000.jpg").size == (16, 12)
