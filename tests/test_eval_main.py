"""`dora-eval knn|davis|track` on a tiny checkpoint: reports written, bad input exits 2."""
import json
import os

import numpy as np
from PIL import Image
import pytest

import dora_runs

from dora_jax.cli import eval as eval_main
from dora_jax import config_base
from dora_jax.data import synthetic
from dora_jax.evaluation import davis
from dora_jax.evaluation import knn
from dora_jax.evaluation import track
from dora_jax import objects
from dora_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """(work folder, its teacher's ViT built in memory); the student is all zeros, so evaluating
  it by mistake fails (its features are all equal: k-NN at chance, other tracking and DAVIS
  numbers)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, dora_runs.save_untrained_run(workdir)


@pytest.fixture(scope="module")
def run_dir(saved_run):
  return saved_run[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for split, count in (("train", 3), ("val", 2)):
    for label, name in enumerate(("blue", "green", "red")):
      os.makedirs(root / split / name)
      for i in range(count):
        pixels = np.zeros((20, 24, 3))
        pixels[..., 2 - label] = 200
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.png")
  os.makedirs(root / "tour")
  tour = synthetic.generate_walking_tour(str(root / "tour" / "walking_tour.mp4"), num_frames=8,
                                         width=48, height=32, fps=5, num_objects=2, seed=0)
  masks = synthetic.load_masks(tour["video"])["masks"]
  frames, _ = track.load_tour(tour["video"])
  for sub in ("JPEGImages", "Annotations"):
    os.makedirs(root / "DAVIS" / sub / "480p" / "walk")
  for i in range(4):
    Image.fromarray(frames[i]).save(root / "DAVIS" / "JPEGImages" / "480p" / "walk" / f"{i:05d}.jpg")
    davis.write_indexed_png(str(root / "DAVIS" / "Annotations" / "480p" / "walk" / f"{i:05d}.png"),
                            masks[i], davis.default_palette())
  return root


def _main(args, capsys):
  code = eval_main.main(args + ["--no-progress"])
  out, err = capsys.readouterr()
  return code, out, err


def test_knn(run_dir, data, tmp_path, capsys):
  out = tmp_path / "knn"
  code, stdout, _ = _main(["knn", "--checkpoint", run_dir, "--train", str(data / "train"),
                           "--val", str(data / "val"), "--k", "2", "--resize-size", "20",
                           "--crop-size", "16", "--out", str(out)], capsys)
  assert code == 0
  report = json.loads((out / knn.REPORT_FILE).read_text())
  assert (report["num_train"], report["num_val"], report["num_classes"], report["k"]) == (9, 6, 3, 2)
  assert report["top1"] == 100.0  # Flat colours: told apart even by a random ViT.
  assert stdout.startswith("k-NN (k=2, T=0.07): top-1 100.00%")


def test_track_uses_the_checkpoints_teacher(saved_run, data, tmp_path, capsys):
  run_dir, teacher = saved_run
  out = tmp_path / "track"
  args = ["--clips", "2", "--frames-per-clip", "2", "--frame-stride", "3", "--short-side", "16",
          "--num-objects", "2"]
  code, stdout, _ = _main(["track", "--checkpoint", run_dir, "--data", str(data / "tour"),
                           "--out", str(out)] + args, capsys)
  assert code == 0
  report = json.loads((out / track.REPORT_FILE).read_text())
  settings = track.TrackSettings(num_clips=2, frames_per_clip=2, frame_stride=3, short_side=16,
                                 size_multiple=8, dora=objects.DoraOptions(num_objects=2), seed=0)
  expected = track.evaluate_tracking(teacher, str(data / "tour" / "walking_tour.mp4"), settings)
  assert report["track_iou"] == pytest.approx(expected["track_iou"])
  assert report["settings"]["size_multiple"] == 8  # The checkpoint's patch size.
  assert stdout.startswith("tracking IoU ")
  code, _, err = _main(["track", "--checkpoint", run_dir, "--data", str(data / "tour"),
                        "--out", str(tmp_path / "t2"), "--num-objects", "3"], capsys)
  assert code == 2 and "--num-objects 3 exceeds the backbone's 2 heads" in err


def test_flags_that_a_training_config_has_default_to_config_bases(monkeypatch):
  """The track flags that a training config also has read config_base's defaults when the parser
  is built; the k-NN's are DINO's (knn.DEFAULTS)."""
  changed = config_base.get_base_config()
  changed.dora.update(num_objects=5, sinkhorn_iters=7, sinkhorn_epsilon=0.5,
                      mask_threshold="batch_mean")
  changed.seed = 4
  monkeypatch.setattr(config_base, "get_base_config", lambda: changed)
  parser = eval_main.build_parser()
  track_args = parser.parse_args(["track", "--checkpoint", "c", "--data", "d", "--out", "o"])
  assert (track_args.num_objects, track_args.sinkhorn_iters, track_args.sinkhorn_epsilon,
          track_args.mask_threshold, track_args.clips, track_args.seed) == (
              5, 7, 0.5, "batch_mean", track.DEFAULTS["clips"], 4)
  knn_args = parser.parse_args(["knn", "--checkpoint", "c", "--train", "t", "--val", "v",
                                "--out", "o"])
  assert (knn_args.k, knn_args.temperature) == (20, 0.07) == (knn.DEFAULTS["k"],
                                                              knn.DEFAULTS["temperature"])


def test_davis(saved_run, data, tmp_path, capsys):
  run_dir, teacher = saved_run
  out = tmp_path / "davis"
  code, stdout, _ = _main(["davis", "--checkpoint", run_dir, "--data", str(data / "DAVIS"),
                           "--sequences", "walk", "--short-side", "16", "--size-multiple", "8",
                           "--out", str(out)],
                          capsys)
  assert code == 0
  report = json.loads((out / davis.METRICS_FILE).read_text())
  assert 0 <= report["J&F"] <= 1 and list(report["sequences"]) == ["walk"]
  expected = davis.evaluate_davis(
      teacher, str(data / "DAVIS"), str(tmp_path / "expected"), sequences=["walk"],
      settings=davis.PropagationSettings(short_side=16, size_multiple=8), progress=False)
  assert report["sequences"] == expected["sequences"]  # The teacher's numbers.
  assert sorted(os.listdir(out / "walk")) == [f"{i:05d}.png" for i in range(4)]
  assert stdout.startswith("DAVIS-2017 (1 sequences")


def test_bad_input_is_one_line_and_exit_2(run_dir, data, tmp_path, capsys):
  out = tmp_path / "out"
  cases = [
      (["knn", "--checkpoint", str(tmp_path), "--train", str(data / "train"), "--val",
        str(data / "val")], "is not a dora-train work folder"),
      (["knn", "--checkpoint", run_dir, "--train", str(tmp_path / "nope"), "--val",
        str(data / "val")], "nope does not exist"),
      (["davis", "--checkpoint", run_dir, "--data", str(data / "DAVIS")],
       "ImageSets/2017/val.txt does not exist"),
      (["track", "--checkpoint", run_dir, "--data", str(data / "train")],
       "holds 0 .mp4 videos"),
      (["track", "--checkpoint", run_dir, "--data", str(data / "tour"), "--mask-threshold",
        "median"], "--mask-threshold 'median': expected a number or one of 'mean', 'batch_mean'"),
  ]
  for args, message in cases:
    code, stdout, err = _main(args + ["--out", str(out)], capsys)
    assert code == 2 and stdout == "", args
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith(f"dora-eval {args[0]}: error: ")
  assert not out.exists()  # Nothing was written.

  # A checkpoint of another model: its config says a wider ViT than the arrays hold.
  other = tmp_path / "other"
  os.makedirs(other)
  os.symlink(os.path.join(run_dir, checkpoint.CHECKPOINT_DIR), other / checkpoint.CHECKPOINT_DIR)
  config = json.loads(open(os.path.join(run_dir, checkpoint.CONFIG_FILE)).read())
  config["model"]["dim"] = 64
  (other / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
  code, _, err = _main(["knn", "--checkpoint", str(other), "--train", str(data / "train"),
                        "--val", str(data / "val"), "--out", str(out)], capsys)
  assert code == 2 and f"cannot load --checkpoint {other}" in err and "has shape" in err
  assert len(err.strip().splitlines()) == 1 and not out.exists()
