"""`dora-eval seg` end to end on a tiny ADE-layout folder (from a synthetic tour) and a tiny
random checkpoint; its one-line errors."""
import json
import os

import numpy as np
from PIL import Image
import pytest

import dora_runs

from dora_jax.cli import eval as eval_main
from dora_jax.data import eval_sets
from dora_jax.data import synthetic
from dora_jax.evaluation import track


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A work folder with one checkpoint of a freshly initialised tiny model (patch 8)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  dora_runs.save_untrained_run(workdir)
  return workdir


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
  """The ADE layout of a 8-frame tour: frames 0-5 training, 6-7 validation."""
  root = tmp_path_factory.mktemp("seg")
  tour = synthetic.generate_walking_tour(str(root / "tour.mp4"), num_frames=8, width=48,
                                         height=32, fps=5, num_objects=3, seed=0)
  truth = synthetic.load_masks(tour["video"])
  frames, _ = track.load_tour(tour["video"])
  for split, part in (("training", slice(0, 6)), ("validation", slice(6, 8))):
    eval_sets.write_ade20k_layout(frames[part], truth["masks"][part], truth["classes"],
                                  str(root / "ADE"), split, class_names=truth["class_names"])
  return root / "ADE", 1 + len(truth["class_names"])


def _main(args, capsys):
  code = eval_main.main(args + ["--no-progress"])
  out, err = capsys.readouterr()
  return code, out, err


def test_seg(run_dir, ade, tmp_path, capsys):
  root, num_classes = ade
  out = tmp_path / "out"
  code, stdout, err = _main(["seg", "--checkpoint", run_dir, "--data", str(root), "--out",
                             str(out), "--iterations", "4", "--batch-size", "2",
                             "--image-size", "32", "--blocks", "1"], capsys)
  assert code == 0, err
  report = json.loads((out / "seg_metrics.json").read_text())
  assert 0 <= report["mIoU"] <= 100 and 0 <= report["aAcc"] <= 100
  assert list(report["per_class_IoU"])[0] == "background"
  assert (report["num_train"], report["num_val"], report["num_classes"]) == (6, 2, num_classes)
  for name in ("00000", "00001"):
    prediction = np.asarray(Image.open(out / "pred" / f"{name}.png"))
    assert prediction.shape == (32, 48)  # The annotation's size, not the 32 x 32 input.
    assert 1 <= prediction.min() and prediction.max() <= num_classes
  assert sorted(os.listdir(out / "pictures")) == ["00000.png", "00001.png"]
  assert os.path.isdir(out / "readout")
  assert stdout.startswith(f"linear segmentation ({num_classes} classes, 4 iterations, 32 px)")


def test_seg_bad_input_is_one_line_and_exit_2(run_dir, ade, tmp_path, capsys):
  root, _ = ade
  out = tmp_path / "out"
  no_annotations = tmp_path / "bare"
  os.makedirs(no_annotations / "images" / "training")
  missing = tmp_path / "missing"
  for split in ("training", "validation"):
    for sub in ("images", "annotations"):
      os.makedirs(missing / sub / split)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(missing / "images" / "training" / "a.jpg")
  cases = [
      (["--data", str(no_annotations)], "has no annotations/training folder"),
      (["--data", str(missing)], "a.jpg has no annotation"),
      (["--data", str(root), "--image-size", "36"],
       "--image-size 36 is not a multiple of the checkpoint's patch size 8"),
      (["--data", str(root), "--train", "tfds:x:train"], "give --data ROOT"),
  ]
  for extra, message in cases:
    code, stdout, err = _main(["seg", "--checkpoint", run_dir, "--out", str(out)] + extra, capsys)
    assert code == 2 and stdout == "", extra
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("dora-eval seg: error: ")
  assert not out.exists()
