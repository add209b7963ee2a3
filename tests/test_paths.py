"""Cloud URLs as work and data folders: everything outside orbax goes through etils.epath.

A fake bucket `gs://bucket/...` is served from a local folder by etils' own mock of its
backends, so these tests exercise the non-local code paths (no `os.path` / `open` on a URL)
without a network.
"""
import json
import shutil


import ml_collections
import numpy as np
import pytest

import dora_runs

from dora_jax import config_base
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import pipeline
from dora_jax.data import synthetic
from dora_jax import paths
from dora_jax import checkpoint
from dora_jax.trainer import metrics
from dora_jax.trainer import pictures
from dora_jax.trainer import preflight

BUCKET = dora_runs.BUCKET
fake_bucket = dora_runs.fake_bucket


def test_paths_on_a_url_go_through_epath(tmp_path):
  assert paths.is_remote("gs://b/x") and not paths.is_remote("/tmp/x")
  assert not paths.is_remote("file:///tmp/x") and paths.absolute("gs://b/x") == "gs://b/x"
  with fake_bucket(str(tmp_path)) as opened:
    target = paths.join(BUCKET, "a", "b.bin")
    assert target == "gs://bucket/a/b.bin"
    paths.makedirs(paths.join(BUCKET, "a"))
    paths.write_bytes(target, bytes(range(100)))
    assert paths.exists(target) and paths.size(target) == 100
    assert paths.read_range(target, 10, 5) == bytes(range(10, 15))
    with pytest.raises(FileNotFoundError):
      paths.read_bytes(paths.join(BUCKET, "missing"))
  assert (tmp_path / "a" / "b.bin").read_bytes() == bytes(range(100))
  assert target in opened


def test_metrics_config_and_pictures_in_a_bucket(tmp_path, monkeypatch):
  # TensorBoard's own gs:// writer needs google-cloud-storage: not what is tested here.
  monkeypatch.setattr(metrics.tensorboardX, "SummaryWriter", dora_runs.NoTensorBoard)
  workdir = paths.join(BUCKET, "runs", "one")
  with fake_bucket(str(tmp_path)):
    paths.makedirs(workdir)
    writer = metrics.MetricWriter(workdir, start_step=0, total_steps=4, show_progress=False)
    for step in range(1, 5):
      writer.write_scalars(step, {"loss": 1.0 / step})
    writer.close()
    resumed = metrics.MetricWriter(workdir, start_step=2, total_steps=4, show_progress=False)
    resumed.write_scalars(3, {"loss": 9.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)] == [
        (1, 1.0), (2, 0.5), (3, 9.0)]
    config = config_base.get_base_config()
    checkpoint.write_config(workdir, config)
    assert checkpoint.read_config(workdir).model.variant == config.model.variant
    picture = np.zeros((8, 8, 3), np.uint8)
    pictures.save_picture(paths.join(workdir, "p.png"), picture)
    # A run folder and its checkpoints/STEP folders are recognised on a URL too.
    assert checkpoint.resolve_run(workdir) == (workdir, workdir + "/checkpoints", None)
    assert checkpoint.resolve_run(workdir + "/checkpoints/7") == (
        workdir, workdir + "/checkpoints", 7)
    with pytest.raises(preflight.ConfigError, match="must be local"):
      preflight.data_config_for(ml_collections.ConfigDict(
          {"data": dict(config.data.to_dict(), synthetic=True)}), workdir)
  local = tmp_path / "runs" / "one"
  assert json.loads((local / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 9.0
  assert (local / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_clips_read_from_a_bucket_equal_the_local_ones(tmp_path):
  local_dir = synthetic.ensure_demo_data(str(tmp_path / "tour"), num_frames=24, width=64,
                                         height=48, short_side=48)
  shutil.copytree(local_dir, tmp_path / "bucket" / "data")
  config = config_base.get_base_config().data
  config.frames_per_clip, config.frame_stride = 2, 3
  config.global_pre_size, config.global_size, config.local_size = 40, 32, 16
  config.num_local_crops, config.num_workers = 1, 0
  config.dir = local_dir
  expected = pipeline.make_dataset(pipeline.plan_clips(config), config, seed=0)
  with fake_bucket(str(tmp_path / "bucket")) as opened:
    config.dir = paths.join(BUCKET, "data")
    plan = pipeline.plan_clips(config)
    assert manifest_lib.load(config.dir)["videos"][0]["num_frames"] == 24
    remote = pipeline.make_dataset(plan, config, seed=0)
    for index in (0, 5):
      for key in ("frames", "crops"):
        np.testing.assert_array_equal(remote[index][key], expected[index][key])
  assert any(path.endswith(".tfrecord") for path in opened)  # Records read through epath.
