"""The grain pipeline: clip index, validation errors, determinism, state restore, host split."""
import json

import numpy as np
import pytest

from dora_jax import config_base
from dora_jax.data import convert
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import pipeline
from dora_jax.data import source
from dora_jax.data import synthetic

LENGTHS = {"alpha": 30, "beta": 20}  # Two videos of different length.
T, STRIDE = 3, 4  # A clip spans (T - 1) * STRIDE + 1 = 9 stored frames.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  videos = []
  for seed, (name, length) in enumerate(LENGTHS.items()):
    path = str(root / f"{name}.mp4")
    synthetic.generate_walking_tour(path, num_frames=length, width=64, height=48, fps=10,
                                    num_objects=2, seed=seed)
    videos.append(path)
  out = str(root / "shards")
  convert.convert(videos, out, short_side=48, frames_per_shard=8, progress=False)
  return out


def _config(data_dir, **overrides):
  config = config_base.get_base_config().data
  config.dir = data_dir
  config.frames_per_clip, config.frame_stride = T, STRIDE
  config.global_pre_size, config.global_size = 40, 32
  config.local_size, config.num_local_crops = 16, 2
  config.num_workers = 0
  for key, value in overrides.items():
    config[key] = value
  return config


def _iterator(config, *, batch_size, seed):
  return pipeline.make_train_iterator(pipeline.plan_clips(config), config, batch_size=batch_size,
                                      seed=seed)


def _dataset(config, **kwargs):
  return pipeline.make_dataset(pipeline.plan_clips(config), config, **kwargs)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_num_clips_and_clips_never_cross_videos(data_dir):
  span = (T - 1) * STRIDE + 1
  assert pipeline.plan_clips(_config(data_dir)).num_clips == sum(n - span + 1 for n in LENGTHS.values())
  assert pipeline.plan_clips(_config(data_dir, video_ids=("beta",))).num_clips == LENGTHS["beta"] - span + 1
  manifest = manifest_lib.load(data_dir)
  clips = source.ClipSource(data_dir, manifest_lib.select_videos(manifest, (), data_dir), T, STRIDE)
  seen = set()
  for index in range(len(clips)):
    video, frames = clips.index.frames(index)
    records = [clips.store.read_frame(video, int(f)) for f in frames]
    assert len({r["video_id"] for r in records}) == 1  # One video per clip.
    stored = [r["frame_index"] for r in records]  # Source frame numbers, STRIDE apart.
    assert np.all(np.diff(stored) == STRIDE)
    seen.add((records[0]["video_id"], stored[0]))
  assert seen == {(name, start) for name, n in LENGTHS.items() for start in range(n - span + 1)}


def test_batches_have_the_contract_shapes(data_dir):
  batch = next(_iterator(_config(data_dir), batch_size=4, seed=0))
  assert batch["frames"].shape == (4, T, 32, 32, 3) and batch["frames"].dtype == np.uint8
  assert batch["crops"].shape == (4, T, 2, 16, 16, 3) and batch["crops"].dtype == np.uint8
  no_crops = next(_iterator(_config(data_dir, num_local_crops=0), batch_size=2, seed=0))
  assert set(no_crops) == {"frames"}


def test_dino_batches_are_frames_with_two_different_global_crops(data_dir):
  config = _config(data_dir, frames_per_clip=1, frame_stride=1, global_pre_size=0,
                   global_size=48, global_crops_per_frame=2, global_blur_prob=1.0,
                   local_flip_prob=0.5)
  plan = pipeline.plan_clips(config)
  assert plan.num_clips == sum(LENGTHS.values())  # Every stored frame is an image.
  batch = next(_iterator(config, batch_size=4, seed=0))
  assert set(batch) == {"frames", "second_frames", "crops"}
  assert batch["frames"].shape == batch["second_frames"].shape == (4, 1, 48, 48, 3)
  assert batch["crops"].shape == (4, 1, 2, 16, 16, 3)
  assert all(batch[key].dtype == np.uint8 for key in batch)
  for first, second in zip(batch["frames"], batch["second_frames"]):
    assert np.abs(first.astype(int) - second).mean() > 5  # Other crop, flip, colour, blur.


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  config = _config(data_dir)
  a = _iterator(config, batch_size=4, seed=1)
  b = _iterator(config, batch_size=4, seed=1)
  c = _iterator(config, batch_size=4, seed=2)
  first_a, first_b, first_c = ([next(it) for _ in range(3)] for it in (a, b, c))
  assert all(_equal(x, y) for x, y in zip(first_a, first_b))
  assert not any(np.array_equal(x["frames"], y["frames"]) for x, y in zip(first_a, first_c))


def test_restoring_the_state_after_n_batches_gives_batches_n_plus_1_on(data_dir):
  config = _config(data_dir)
  iterator = _iterator(config, batch_size=4, seed=3)
  batches = [next(iterator) for _ in range(12)]  # 34 clips: past the first epoch's end.
  for n in (2, 9):
    replay = _iterator(config, batch_size=4, seed=3)
    for _ in range(n):
      next(replay)
    state = json.loads(json.dumps(replay.get_state()))  # What a checkpoint stores.
    restored = _iterator(config, batch_size=4, seed=3)
    restored.set_state(state)
    assert all(_equal(next(restored), batches[k]) for k in range(n, n + 3))


def test_epochs_are_reshuffled_and_hosts_see_disjoint_clips(data_dir):
  config = _config(data_dir)
  total = pipeline.plan_clips(config).num_clips

  def clip_ids(dataset, start, count):
    return [(int(dataset[i]["video"]), int(dataset[i]["frames"][0])) for i in range(start,
                                                                                     start + count)]

  single = _dataset(config, seed=4, with_clip_ids=True)
  epoch0, epoch1 = clip_ids(single, 0, total), clip_ids(single, total, total)
  assert len(set(epoch0)) == total and set(epoch0) == set(epoch1) and epoch0 != epoch1

  hosts = [_dataset(config, seed=4, batch_size=1, process_index=p, process_count=2,
                    with_clip_ids=True) for p in range(2)]
  host0, host1 = (set(clip_ids(h, 0, total // 2)) for h in hosts)
  assert not host0 & host1 and host0 | host1 == set(epoch0)  # One epoch, split in two.
  # The same clip gets the same views whichever host serves it.
  np.testing.assert_array_equal(hosts[1][0]["frames"], single[1]["frames"])


def test_host_batches_stacked_in_process_order_are_the_single_process_batch(data_dir):
  config = _config(data_dir)
  single = _dataset(config, seed=6, with_clip_ids=True)
  per_host = 3
  hosts = [_dataset(config, seed=6, batch_size=per_host, process_index=p, process_count=2,
                    with_clip_ids=True) for p in range(2)]
  for batch in range(3):
    stacked = [hosts[p][batch * per_host + j] for p in range(2) for j in range(per_host)]
    expected = [single[batch * 2 * per_host + i] for i in range(2 * per_host)]
    for got, want in zip(stacked, expected):
      assert (int(got["video"]), list(got["frames"])) == (int(want["video"]), list(want["frames"]))
      np.testing.assert_array_equal(got["crops"], want["crops"])  # The same views too.


def test_bad_config_gives_one_line_errors_naming_the_key(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"has no manifest\.json; run `dora-convert"):
    pipeline.plan_clips(_config(str(tmp_path)))
  with pytest.raises(ValueError, match=r"data\.video_ids: 'gamma' is not in"):
    pipeline.plan_clips(_config(data_dir, video_ids=("gamma",)))
  with pytest.raises(ValueError, match=r"data\.frames_per_clip must be an integer >= 1"):
    pipeline.plan_clips(_config(data_dir, frames_per_clip=0))
  with pytest.raises(ValueError, match=r"data\.frames_per_clip=9 at data\.frame_stride=4 spans 33 "
                     r".*longest video .*\('alpha'\) has 30"):
    pipeline.plan_clips(_config(data_dir, frames_per_clip=9))
  with pytest.raises(ValueError, match=r"data\.global_pre_size=64 .* stored frames 64x48"):
    pipeline.plan_clips(_config(data_dir, global_pre_size=64))
  with pytest.raises(ValueError, match=r"data\.global_crops_per_frame=3 must be 1 .* or 2"):
    pipeline.plan_clips(_config(data_dir, global_crops_per_frame=3))
  with pytest.raises(ValueError, match=r"data\.second_global_solarize_prob=1\.5 must be a "
                     "probability"):
    pipeline.plan_clips(_config(data_dir, second_global_solarize_prob=1.5))
  assert pipeline.plan_clips(_config(data_dir, frames_per_clip=8, frame_stride=3)).videos


def test_worker_processes_give_the_same_batches_and_restore(data_dir):
  inline = _iterator(_config(data_dir), batch_size=2, seed=5)
  expected = [next(inline) for _ in range(5)]
  config = _config(data_dir, num_workers=2)
  workers = _iterator(config, batch_size=2, seed=5)
  try:
    got = [next(workers) for _ in range(3)]
    state = json.loads(json.dumps(workers.get_state()))
  finally:
    workers.close()
  restored = _iterator(config, batch_size=2, seed=5)
  try:
    restored.set_state(state)
    got += [next(restored) for _ in range(2)]
  finally:
    restored.close()
  assert all(_equal(a, b) for a, b in zip(got, expected))  # Same as without workers.
