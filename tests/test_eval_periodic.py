"""The evaluations during pretraining (`config.evals`, the registry): keys, errors, cadence, and
a run of every evaluator on tiny generated data."""
import argparse
import os

from flax import nnx
import numpy as np
from PIL import Image
import pytest

from dora_jax import config_base
from dora_jax.data import eval_sets
from dora_jax.data import images as images_lib
from dora_jax.data import synthetic
from dora_jax.evaluation import davis
from dora_jax.evaluation import discover
from dora_jax.evaluation import knn
from dora_jax.evaluation import periodic
from dora_jax.evaluation import registry
from dora_jax.evaluation import seg
from dora_jax.evaluation import seg_data
from dora_jax.evaluation import track
from dora_jax import objects
from dora_jax.models import vit


def _config(**evals):
  """A tiny training config (ViT of 4 heads, 8-px patches, 16-px frames) with `evals`:
  {NAME: {key: value}} (every key of the type's DEFAULTS not given keeps its default)."""
  config = config_base.get_base_config()
  config.model.variant = "Ti/8"
  config.model.dim, config.model.depth, config.model.num_heads = 32, 2, 4
  config.data.global_size, config.data.frames_per_clip, config.data.frame_stride = 16, 3, 2
  config.dora.num_objects = 2
  for name, keys in evals.items():
    config.evals[name] = keys
  return config


def _model(seed=0):
  return vit.VisionTransformer(None, dim=32, depth=2, num_heads=4, patch_size=8, img_size=16,
                               rngs=nnx.Rngs(seed))


def _colour_folder(root, images_per_class):
  """Three classes of flat colours (red, green, blue) with a little noise."""
  rng = np.random.default_rng(0)
  for label, name in enumerate(("blue", "green", "red")):
    os.makedirs(root / name)
    for i in range(images_per_class):
      colour = np.zeros(3)
      colour[2 - label] = 200
      pixels = np.clip(colour + rng.normal(0, 10, size=(20, 20, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A synthetic tour, and from it the DAVIS, ADE20K and VOC layouts; two colour folders."""
  root = tmp_path_factory.mktemp("data")
  os.makedirs(root / "tour")
  tour = synthetic.generate_walking_tour(str(root / "tour" / "walking_tour.mp4"), num_frames=10,
                                         width=48, height=32, fps=5, num_objects=2, seed=0)
  frames, masks = track.load_tour(tour["video"])
  truth = synthetic.load_masks(tour["video"])
  for sub in ("JPEGImages", "Annotations"):
    os.makedirs(root / "DAVIS" / sub / "480p" / "walk")
  for i in range(4):
    Image.fromarray(frames[i]).save(
        root / "DAVIS" / "JPEGImages" / "480p" / "walk" / f"{i:05d}.jpg")
    davis.write_indexed_png(
        str(root / "DAVIS" / "Annotations" / "480p" / "walk" / f"{i:05d}.png"), masks[i],
        davis.default_palette())
  os.makedirs(root / "DAVIS" / "ImageSets" / "2017")
  (root / "DAVIS" / "ImageSets" / "2017" / "val.txt").write_text("walk\n")
  for split, part in zip(seg_data.SPLITS, (slice(0, 6), slice(6, 10))):
    eval_sets.write_ade20k_layout(frames[part], masks[part], truth["classes"],
                                  str(root / "ADE"), split, class_names=truth["class_names"])
  eval_sets.write_voc_layout(frames, masks, truth["classes"], truth["class_names"],
                             str(root / "VOC"), min_area=16)
  return {"tour": str(root / "tour"), "davis": str(root / "DAVIS"), "ade": str(root / "ADE"),
          "voc": str(root / "VOC"), "train": _colour_folder(root / "train", 4),
          "val": _colour_folder(root / "val", 2)}


def test_defaults_evaluate_nothing():
  config = _config()
  assert not config.evals  # config_base declares none.
  evaluator = periodic.PeriodicEvaluator.from_config(config)
  assert not evaluator.enabled and not evaluator.due(100, 100)
  # An entry that is off is not built: its empty data is not an error.
  off = periodic.PeriodicEvaluator.from_config(_config(knn=registry.config("knn")))
  assert not off.enabled


def test_every_evaluator_has_the_registry_names_and_its_flags_are_its_keys():
  base = config_base.get_base_config()
  for type_name in registry.TYPES:
    module = registry.module(type_name)
    assert module.__name__ == f"dora_jax.evaluation.{type_name}"
    assert set(module.SCORES) and module.REPORT_FILE.endswith(".json")
    parser = argparse.ArgumentParser()
    module.add_flags(parser, base)
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == set(module.DEFAULTS), type_name  # config.evals.NAME.KEY is --KEY.
    entry = registry.config(type_name, every_steps=3)
    assert (entry.type, entry.every_steps) == (type_name, 3)
    assert set(entry) == set(module.DEFAULTS) | {"type", "every_steps"}


def test_bad_entries_name_the_key(data):
  cases = [
      (dict(knn_small=dict(type="knnn", every_steps=1)),
       "config.evals.knn_small.type='knnn' is no evaluation; known: knn, seg, davis"),
      (dict(knn=dict(every_steps=1, train=data["train"], val=data["val"], kk=3)),
       "config.evals.knn.kk is no setting of the knn evaluator; its keys: batch_size"),
      (dict(knn=dict(every_steps=1, train=data["train"])),
       "config.evals.knn.val is empty: the k-NN needs an image folder"),
      (dict(knn=dict(every_steps=1, train=data["train"], val=data["val"], k=0)),
       "config.evals.knn.k=0: expected a positive integer."),
      (dict(track=dict(every_steps=1, data="demo")),
       'config.evals.track.data="demo" needs the synthetic tour of data.synthetic'),
      (dict(track=dict(every_steps=1, data=data["tour"], num_objects=5)),
       "config.evals.track.num_objects 5 exceeds the backbone's 4 heads"),
      (dict(seg=dict(every_steps=1, data=data["ade"], image_size=20)),
       "config.evals.seg.image_size 20 is not a multiple of the checkpoint's patch size 8"),
      (dict(davis=dict(every_steps=1, data=data["davis"], short_side=20)),
       "config.evals.davis.short_side 20 and config.evals.davis.size_multiple 64 must be"),
      (dict(discover=dict(every_steps=-1, data=data["voc"])),
       "config.evals.discover.every_steps=-1: expected an integer >= 0"),
  ]
  for evals, message in cases:
    with pytest.raises(registry.SettingError) as error:
      periodic.PeriodicEvaluator.from_config(_config(**evals))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_data_fails_when_the_evaluator_is_built(tmp_path, data):
  cases = [
      (dict(knn=dict(every_steps=10, train=str(tmp_path / "a"), val=data["val"])),
       images_lib.SourceError, "does not exist"),
      (dict(track=dict(every_steps=10, data=str(tmp_path / "t.mp4"))), track.TourError,
       "does not exist"),
      (dict(track=dict(every_steps=10, data=data["tour"], frame_stride=5)), track.TourError,
       "the tour has 10 frames"),  # The clips are cut when the evaluator is built.
      (dict(seg=dict(every_steps=5, data=str(tmp_path))), seg_data.SegError,
       "has no images/training folder"),
      (dict(davis=dict(every_steps=5, data=str(tmp_path))), davis.DavisError,
       "JPEGImages/480p does not exist"),
      (dict(discover=dict(every_steps=5, data=str(tmp_path))), discover.voc.VocError,
       "does not exist"),
  ]
  for evals, error, message in cases:
    with pytest.raises(error, match=message):
      periodic.PeriodicEvaluator.from_config(_config(**evals))


def test_track_settings_come_from_the_training_config(data):
  evaluator = periodic.PeriodicEvaluator.from_config(
      _config(track=dict(every_steps=1, data="demo", clips=2)), demo_tour=data["tour"])
  assert evaluator.scheduled[0].evaluator.settings == track.TrackSettings(
      num_clips=2, frames_per_clip=3, frame_stride=2, short_side=16, size_multiple=8,
      dora=objects.DoraOptions(num_objects=2, sinkhorn_iters=3, sinkhorn_epsilon=0.05,
                               mask_mode="remove", mask_threshold="mean"), seed=0)
  # Its own keys win over the training config's.
  evaluator = periodic.PeriodicEvaluator.from_config(_config(track=dict(
      every_steps=1, data=data["tour"], frames_per_clip=2, num_objects=3, mask_threshold="0.5",
      seed=7)))
  settings = evaluator.scheduled[0].evaluator.settings
  assert (settings.frames_per_clip, settings.dora.num_objects, settings.dora.mask_threshold,
          settings.seed) == (2, 3, 0.5, 7)


def test_every_evaluator_runs_during_pretraining(data, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Nothing may be written, here or beside the data.
  before = {name: sorted(os.listdir(path)) for name, path in data.items()}
  config = _config(
      knn=dict(every_steps=5, train=data["train"], val=data["val"], k=3, resize_size=20,
               crop_size=16, batch_size=6),
      knn_one=dict(type="knn", every_steps=6, train=data["train"], val=data["val"], k=1,
                   resize_size=20, crop_size=16),  # A second k-NN beside the first.
      track=dict(every_steps=5, data=data["tour"], clips=2, batch_size=6),
      seg=dict(every_steps=6, data=data["ade"], iterations=3, batch_size=2),
      davis=dict(every_steps=5, data=data["davis"], short_side=16, size_multiple=8),
      discover=dict(every_steps=5, data=data["voc"], batch_size=2))
  evaluator = periodic.PeriodicEvaluator.from_config(config)
  assert [s for s in range(1, 13) if evaluator.due(s, total_steps=13)] == [5, 6, 10, 12]
  assert evaluator.due(13, total_steps=13)  # The last step, for every evaluation.
  model = _model()
  metrics = evaluator.run(model, step=5, total_steps=13)
  assert set(metrics) == {"knn/top1", "knn/top5", "track/track_iou", "track/track_iou_last",
                          "davis/J&F", "davis/J", "davis/F", "discover/CorLoc"}
  last = evaluator.run(model, step=13, total_steps=13)
  assert set(last) == set(metrics) | {"knn_one/top1", "knn_one/top5", "seg/mIoU", "seg/aAcc",
                                      "seg/mAcc"}
  assert {key: last[key] for key in metrics} == metrics  # Same model, same numbers.
  assert {name: sorted(os.listdir(path)) for name, path in data.items()} == before
  assert not os.listdir(tmp_path)

  # Each is its module's number, computed without the registry.
  sources = [images_lib.open_source(data[split]) for split in ("train", "val")]
  expected = knn.evaluate_knn(model, *sources, k=3, resize_size=20, crop_size=16, progress=False)
  assert (last["knn/top1"], last["knn/top5"]) == (expected["top1"], expected["top5"]) == (100, 100)
  expected = knn.evaluate_knn(model, *sources, k=1, resize_size=20, crop_size=16, progress=False)
  assert last["knn_one/top1"] == expected["top1"]
  expected = track.evaluate_tracking(model, data["tour"], track.TrackSettings(
      num_clips=2, frames_per_clip=3, frame_stride=2, short_side=16, size_multiple=8,
      dora=objects.DoraOptions(num_objects=2), seed=0))
  assert last["track/track_iou"] == pytest.approx(expected["track_iou"])
  assert last["track/track_iou_last"] == pytest.approx(expected["track_iou_per_offset"][-1])
  expected = davis.evaluate_davis(model, data["davis"], None, settings=davis.PropagationSettings(
      short_side=16, size_multiple=8), progress=False)
  assert (last["davis/J&F"], last["davis/J"], last["davis/F"]) == pytest.approx(
      (expected["J&F"], expected["J"], expected["F"]))
  expected = discover.evaluate_discovery(model, data["voc"], None, progress=False)
  assert last["discover/CorLoc"] == pytest.approx(expected["CorLoc"])
  expected = seg.evaluate_seg(
      model, *[seg_data.ADE20KFolder(data["ade"], split) for split in seg_data.SPLITS],
      seg.SegSettings(iterations=3, batch_size=2, image_size=16, num_pictures=0), progress=False)
  assert last["seg/mIoU"] == pytest.approx(expected["mIoU"])

  # Another model, same cached data: other numbers.
  other = evaluator.run(_model(1), step=5, total_steps=13)
  assert other["track/track_iou"] != metrics["track/track_iou"]


def test_an_old_eval_key_names_the_new_one():
  assert config_base.replaced_key("eval.knn_train") == "evals.knn.train"
  assert config_base.replaced_key("eval.track_frame_stride") == "evals.track.frame_stride"
  assert config_base.replaced_key("eval.seg_data") == "evals.seg.data"
  assert config_base.replaced_key("eval.every_steps") == "evals.NAME.every_steps"
  assert config_base.replaced_key("evals.knn.k") is None
  assert config_base.replaced_key("data.dir") is None
