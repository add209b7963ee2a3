"""dora-train end to end on a tiny model: resume after SIGTERM, overrides, NaN stop, bad input.

Four fake CPU devices (conftest.py); every run is a few steps of a 2-block ViT on 32-px frames of
a small synthetic walking tour, as a real `dora-train` process (the runs share a compilation
cache). DORA_SLOW_TESTS=1 adds the full demo (its loss must fall) and a two-process run.
"""
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
from PIL import Image
import pytest

from dora_jax import pretrained
from dora_jax import checkpoint
from dora_jax.trainer import metrics
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import preflight
from dora_jax.trainer import sharding
from dora_jax.trainer import step as train_step
from dora_jax.trainer import train
from dora_runs import DEMO_CONFIG, ROOT, TINY, demo_config, demo_flags, run_to_end
from dora_runs import start_dora_train

# Seconds-valued metrics: they differ between two runs of the same steps.
TIMING_METRICS = ("step_time", "frames_per_second", "tflops", "mfu", "compile_time")


# The runs below also carry a numeric and a string override, to show that both reach the step.
BASE_LR = 0.0123
RUN = dict(optim__base_lr=BASE_LR, dora__mask_mode="keep")


FSDP = {"mesh.fsdp": 2, "mesh.fsdp_min_size": 1024}


@pytest.fixture(scope="module")
def launched(data_dir, env, tmp_path_factory):
  """Starts the two runs that compile different programs side by side (XLA compiles on one core).

  straight: TINY for total_steps steps, uninterrupted.
  dino: configs/dino_vits16_wtours.py, tiny, FSDP over 2 devices, and optim.min_lr=nan. The
    learning rate is finite during the 9 warm-up steps (one epoch) and NaN in the cosine part, so
    update 10 makes the parameters NaN: one run shows the baseline's loop, sharded parameters and
    optimizer state, and the NaN stop.
  """
  folder = tmp_path_factory.mktemp("runs")
  runs = {
      "straight": ["--config", DEMO_CONFIG] + demo_flags(data_dir, **RUN),
      "dino": ["--config", os.path.join(ROOT, "configs", "dino_vits16_wtours.py")] + demo_flags(
          data_dir, picture_every_steps=0, optim__min_lr="nan", **FSDP),
  }
  started = {}
  for name, args in runs.items():
    workdir, log = str(folder / name), str(folder / f"{name}.log")
    started[name] = (start_dora_train(["--workdir", workdir] + args, env, log=log), workdir, log)
  yield started
  for process, _, _ in started.values():
    if process.poll() is None:
      process.kill()


def _wait(run):
  """(workdir, return code, the run's stdout + stderr) once it has ended."""
  process, workdir, log = run
  process.wait(timeout=600)
  with open(log) as f:
    return workdir, process.returncode, f.read()


@pytest.fixture(scope="module")
def straight_run(launched):
  workdir, returncode, output = _wait(launched["straight"])
  assert returncode == 0, output[-3000:]
  return workdir


def _final_state(workdir, config):
  manager = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=10)
  step = manager.latest_step()
  _, abstract = train_step.abstract_train_state(config, plan_lib.TrainPlan.from_config(config))
  mesh = sharding.make_mesh(config.mesh)
  abstract = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))
  state, data_state = manager.restore(step, abstract)
  manager.close()
  return step, jax.device_get(state), data_state


def _without_timing(rows):
  return [{k: v for k, v in row.items() if k not in TIMING_METRICS} for row in rows]


def test_sigterm_and_resume_equal_a_straight_run(data_dir, env, straight_run, tmp_path):
  total, every = TINY["total_steps"], TINY["checkpoint_every_steps"]
  workdir = str(tmp_path / "resumed")
  args = ["--config", DEMO_CONFIG, "--workdir", workdir] + demo_flags(data_dir, **RUN)
  process = start_dora_train(args, env)
  deadline = time.time() + 300
  while process.poll() is None and time.time() < deadline:
    rows = metrics.read_metrics(workdir)
    # Past the periodic checkpoint (step `every`): the step SIGTERM saves is then none of its.
    if rows and rows[-1]["step"] > every:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.005)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  reported = re.findall(r"SIGTERM: saved step (\d+)", stderr)
  assert len(reported) == 1, "SIGTERM came too late to interrupt the run:\n" + stderr[-3000:]
  interrupted_at = int(reported[0])
  assert every < interrupted_at < total
  saved = sorted(int(name) for name in os.listdir(
      os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) if name.isdigit())
  assert saved == [every, interrupted_at], "the SIGTERM checkpoint is not the step reported"

  run_to_end(args, env)  # The same command again: resumes.

  config = demo_config(data_dir, **RUN)
  step_a, state_a, data_a = _final_state(straight_run, config)
  step_b, state_b, data_b = _final_state(workdir, config)
  assert step_a == step_b == total and data_a == data_b
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)  # Bitwise.
  rows_a, rows_b = metrics.read_metrics(straight_run), metrics.read_metrics(workdir)
  assert [row["step"] for row in rows_a] == list(range(1, total + 1))
  assert _without_timing(rows_a) == _without_timing(rows_b)
  # Each start logs its compile time once, in its first record.
  assert [row["step"] for row in rows_b if "compile_time" in row] == [1, interrupted_at + 1]


def test_run_logs_and_draws(straight_run):
  rows = metrics.read_metrics(straight_run)
  names = {"loss", "lr", "weight_decay", "teacher_momentum", "teacher_temp", "teacher_entropy",
           "teacher_batch_entropy", "prototypes_used",
           "kl", "masked_area", "step_time", "frames_per_second"}
  assert names <= set(rows[-1])
  assert all(np.isfinite(row["loss"]) for row in rows)
  # The evaluators ran inside the loop, every evals.track.every_steps, in the step's record.
  evaluated = {row["step"]: row["track/track_iou"] for row in rows if "track/track_iou" in row}
  assert sorted(evaluated) == [8, 16] and all(0 <= v <= 1 for v in evaluated.values())
  assert min(row["teacher_entropy"] for row in rows) > 0.1  # Not collapsed to one prototype.
  assert all(0 < row["masked_area"] < 1 for row in rows)
  assert all(row["frames_per_second"] > 0 for row in rows)
  # XLA's FLOPs of the step over its time, and over the CPU's measured matmul peak.
  assert all(row["tflops"] > 0 and 0 < row["mfu"] < 1 for row in rows)
  np.testing.assert_allclose([row["mfu"] / row["tflops"] for row in rows],
                             rows[0]["mfu"] / rows[0]["tflops"], rtol=1e-6)  # One peak.
  assert rows[0]["compile_time"] > 0 and not any("compile_time" in row for row in rows[1:])
  pictures = os.listdir(os.path.join(straight_run, train.PICTURES_DIR))
  assert pictures == [f"step_{TINY['total_steps']:07d}.png"]
  assert os.listdir(os.path.join(straight_run, metrics.TENSORBOARD_DIR))


@pytest.mark.skipif(not os.environ.get("DORA_SLOW_TESTS"),
                    reason="the real demo takes ~5 minutes; set DORA_SLOW_TESTS=1")
def test_demo_learns(env, tmp_path):
  """configs/demo.py as the README runs it: the loss falls, the teacher does not collapse."""
  workdir = str(tmp_path / "demo")
  run_to_end(["--config", DEMO_CONFIG, "--workdir", workdir], env, timeout=1200)
  rows = metrics.read_metrics(workdir)
  losses = np.array([row["loss"] for row in rows])
  assert losses[-5:].mean() < losses[:3].mean() - 0.5
  assert min(row["teacher_entropy"] for row in rows) > 0.1
  assert len(os.listdir(os.path.join(workdir, train.PICTURES_DIR))) >= 1


def test_overrides_reach_the_step(data_dir, straight_run):
  """optim.base_lr (numeric) and dora.mask_mode (string) came from the command line."""
  rows = metrics.read_metrics(straight_run)
  config = demo_config(data_dir, **RUN)
  steps_per_epoch, total_steps = preflight.schedule_length(
      config, preflight.prepare_data(config, straight_run)[1].num_clips)
  # The recipe's schedule, in float64: linear warm-up to base_lr * batch / 256, cosine to min_lr.
  peak, warmup = BASE_LR * TINY["batch_size"] / 256, round(TINY["optim.warmup_epochs"] * steps_per_epoch)
  index = np.arange(total_steps, dtype=np.float64)  # The update that logged step i + 1.
  cosine = config.optim.min_lr + 0.5 * (peak - config.optim.min_lr) * (
      1 + np.cos(np.pi * np.clip((index - warmup) / max(total_steps - warmup, 1), 0, 1)))
  expected = np.where(index < warmup, peak * index / max(warmup, 1), cosine)
  np.testing.assert_allclose([row["lr"] for row in rows], expected, rtol=2e-6, atol=1e-12)
  # mask_mode "keep": one masked view per object, so the picture has 1 + k + k rows of tiles.
  picture = np.asarray(Image.open(os.path.join(
      straight_run, train.PICTURES_DIR, f"step_{TINY['total_steps']:07d}.png")))
  k, tile = TINY["dora.num_objects"], 128 + 2  # 32-px frames drawn 4x, 2-px gaps.
  assert picture.shape[0] == 16 + 14 + (1 + k + k) * tile


def test_checkpoint_of_another_model_stops_the_run(data_dir, straight_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight_run, workdir)
  before = _tree(workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="different model"):
    train.train_and_evaluate(demo_config(data_dir, **RUN, **{"model.dim": 48}), workdir)
  assert _tree(workdir) == before


def test_an_extended_run_loads_its_train_step_from_the_cache(data_dir, env, straight_run,
                                                             tmp_path):
  """More total_steps on a finished run's folder: the schedules are the step's inputs, so the
  step compiled for the shorter run (the shared cache of `env`) is the one loaded."""
  workdir = str(tmp_path / "extended")
  shutil.copytree(straight_run, workdir)
  total = TINY["total_steps"] + 2
  # jax then logs at WARNING each persistent-cache hit and each miss.
  logged = dict(env, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")
  stderr = run_to_end(["--config", DEMO_CONFIG, "--workdir", workdir] + demo_flags(
      data_dir, **RUN, total_steps=total, evals__track__every_steps=0,
      picture_every_steps=0), logged)
  assert "Persistent compilation cache hit for 'jit_step'" in stderr, stderr[-3000:]
  assert "CACHE MISS for 'jit_step'" not in stderr
  assert metrics.read_metrics(workdir)[-1]["step"] == total


@pytest.fixture(scope="module")
def dino_run(launched):
  return _wait(launched["dino"])


def test_dino_baseline_runs_the_same_loop_without_tracking(data_dir, dino_run):
  workdir, _, _ = dino_run
  config = json.load(open(os.path.join(workdir, checkpoint.CONFIG_FILE)))
  assert config["dora"]["enabled"] is False and config["model"]["dim"] == TINY["model.dim"]
  rows = metrics.read_metrics(workdir)
  assert [row["step"] for row in rows] == list(range(1, 10))
  assert all(row["masked_area"] == 0.0 for row in rows)  # The student sees whole frames.
  assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
  assert "8" in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
  # The run's mesh was 2 x 2 and its larger arrays were split over 'fsdp': the shardings the
  # arrays had when the run saved them (orbax's metadata of the checkpoint), not ones made here.
  metadata = checkpoint.state_metadata(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), 8)
  split = whole = 0
  for leaf in jax.tree.leaves(metadata):
    assert dict(zip(leaf.sharding.axis_names, leaf.sharding.shape)) == {"data": 2, "fsdp": 2}
    spec = tuple(leaf.sharding.partition_spec)
    size = int(np.prod(leaf.shape, dtype=np.int64))
    if size >= FSDP["mesh.fsdp_min_size"] and any(d % 2 == 0 for d in leaf.shape):
      assert spec.count("fsdp") == 1, (leaf.shape, spec)
      split += 1
    else:
      assert all(axis is None for axis in spec), (leaf.shape, spec)  # Replicated.
      whole += 1
  assert split >= 10 and whole >= 10


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(dino_run):
  workdir, returncode, stderr = dino_run
  assert returncode == 1
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("dora-train: error: the parameters are not finite at step 10: "
                         "stopping. The last good checkpoint is step 8"), last
  assert os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) == ["8"]
  assert max(row["step"] for row in metrics.read_metrics(workdir)) == 9


def _tree(path):
  if not os.path.exists(path):
    return None
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 6}, "batch_size=6 does not divide over the 4 devices"),
    ({"data.frames_per_clip": 1}, "frames_per_clip=1: must be at least 2"),
    ({"dora.num_objects": 3}, "num_objects=3: must be between 1 and the 2 attention heads"),
    ({"data.global_pre_size": 96}, "global_pre_size=96 is larger than the stored frames"),
    ({"data.dir": "/nonexistent/shards"}, "/nonexistent/shards"),
    ({"data.num_videos": 2}, r"num_videos=2: .* has 1 \(selected\) videos"),
    ({"mesh.fsdp": 3}, "mesh.fsdp=3 does not divide the 4 devices"),
])
def test_bad_input_is_one_line_before_anything(data_dir, tmp_path, overrides, message):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  before = _tree(str(workdir))
  with pytest.raises(preflight.ConfigError, match=message) as error:
    train.train_and_evaluate(demo_config(data_dir, **overrides), str(workdir))
  assert "\n" not in str(error.value)
  assert _tree(str(workdir)) == before


def test_data_folder_without_manifest(tmp_path):
  (tmp_path / "empty").mkdir()
  config = demo_config(str(tmp_path / "empty"))
  with pytest.raises(preflight.ConfigError, match="manifest"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_unwritable_workdir(data_dir, tmp_path):
  (tmp_path / "file").write_text("")  # Not a folder: nothing can be created below it, even by root.
  with pytest.raises(preflight.ConfigError, match="is not writable"):
    train.train_and_evaluate(demo_config(data_dir), str(tmp_path / "file" / "run"))
  assert _tree(str(tmp_path)) == [("file", 0)]


def test_cli_errors_are_one_line_and_exit_non_zero(data_dir, env, tmp_path):
  workdir = str(tmp_path / "run")
  process = start_dora_train(["--config", DEMO_CONFIG, "--workdir", workdir]
                        + demo_flags(data_dir, **{"data.frames_per_clip": 1}), env)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 2
  errors = [line for line in stderr.splitlines() if "error" in line.lower()]
  assert errors == ["dora-train: error: config data.frames_per_clip=1: must be at least 2 (frame "
                    "0 is the anchor where objects are discovered, the others are where they are "
                    "tracked)."]
  assert not os.path.exists(workdir)

  process = start_dora_train(["--config", DEMO_CONFIG, "--workdir", workdir, "--config.optim.base_lrr=1"],
                        env)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 2
  assert stderr.strip().splitlines()[-1].startswith(
      "dora-train: error: unknown config key 'base_lrr' in --config.optim.base_lrr")


def test_load_backbone_gives_the_trained_teacher(data_dir, straight_run):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  config = demo_config(data_dir, **RUN)
  _, state, _ = _final_state(straight_run, config)
  backbone = pretrained.load_backbone(straight_run)
  # Its weights are the teacher's of the last checkpoint, bitwise.
  teacher = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(state["teacher"])[0]}
  loaded = jax.tree_util.tree_flatten_with_path(nnx.state(backbone, nnx.Param))[0]
  assert len(loaded) > 10
  for path, leaf in loaded:
    name = "backbone/" + "/".join(str(getattr(k, "key", k)) for k in path)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(teacher[name]), err_msg=name)
  # Any size divisible by the patch size: 32 px (trained) and 48 px.
  for size, patches in ((32, 16), (48, 36)):
    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    out = backbone(images)
    assert out["cls"].shape == (2, TINY["model.dim"])
    assert out["tokens"].shape == (2, patches, TINY["model.dim"])
  # A checkpoints/STEP folder of the run works too; a wrong path is an error, never a fallback.
  assert pretrained.load_backbone(os.path.join(straight_run, "checkpoints", "8")) is not None
  with pytest.raises(FileNotFoundError, match="not a dora-train work folder"):
    pretrained.load_backbone(os.path.join(straight_run, "checkpoints"))


def test_two_processes_equal_one_process(data_dir, env, straight_run, tmp_path):
  """The multi-host path (jax.distributed, per-process data, one metrics writer) on one machine.

  Two processes of 2 devices each make the same ('data'=4) mesh as the straight run's one process
  of 4 devices, and each host holds its block of the same global batch (checked bitwise in
  tests/test_data_pipeline.py). The cross-process reductions (gloo) add in another order than the
  in-process ones, so metrics and the final state equal the straight run's to float32 rounding,
  not bitwise.
  """
  import portpicker  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  port = portpicker.pick_unused_port()
  processes = []
  for process_id in range(2):
    process_env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(process_id),
                       XLA_FLAGS=env["XLA_FLAGS"].replace("device_count=4", "device_count=2"))
    processes.append(start_dora_train(
        ["--distributed", "--config", DEMO_CONFIG, "--workdir", workdir]
        + demo_flags(data_dir, **RUN), process_env))
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  total = TINY["total_steps"]
  step_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(total))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(
      os.path.join(step_dir, "data")))
  rows = metrics.read_metrics(workdir)
  assert [row["step"] for row in rows] == list(range(1, total + 1))  # Written once, by process 0.
  for got, want in zip(_without_timing(rows), _without_timing(metrics.read_metrics(straight_run))):
    assert got.keys() == want.keys()
    for key in got:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{key} at step {got['step']}")
  config = demo_config(data_dir, **RUN)
  # This test process is one process: give it the data position of process 0 to restore with.
  shutil.copy(os.path.join(step_dir, "data", "process_0-of-2.json"),
              os.path.join(step_dir, "data", "process_0-of-1.json"))
  _, two, _ = _final_state(workdir, config)
  _, one, _ = _final_state(straight_run, config)
  for got, want in zip(jax.tree.leaves(two["teacher"]), jax.tree.leaves(one["teacher"])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert os.listdir(os.path.join(workdir, train.PICTURES_DIR)) == [f"step_{total:07d}.png"]


@pytest.mark.skipif(not os.environ.get("DORA_SLOW_TESTS"),
                    reason="two jax processes, interrupted and resumed: minutes; DORA_SLOW_TESTS=1")
def test_sigterm_to_one_of_two_processes_saves_everywhere_and_resumes(data_dir, env,
                                                                     straight_run, tmp_path):
  """Multi-host preemption: SIGTERM reaches one host; jax's preemption sync makes every process
  save the same step and exit 0; the restart ends where an uninterrupted run does."""
  import portpicker  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")

  def start(port, total_steps):
    processes = []
    for process_id in range(2):
      process_env = dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                         JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id),
                         XLA_FLAGS=env["XLA_FLAGS"].replace("device_count=4", "device_count=2"))
      log = str(tmp_path / f"process{process_id}-{port}.log")
      processes.append((start_dora_train(
          ["--distributed", "--config", DEMO_CONFIG, "--workdir", workdir]
          + demo_flags(data_dir, total_steps=total_steps, **RUN), process_env, log=log), log))
    return processes

  total = TINY["total_steps"]
  first = start(portpicker.pick_unused_port(), total)
  deadline = time.time() + 600
  while not metrics.read_metrics(workdir) and time.time() < deadline:  # Training has started.
    time.sleep(0.5)
  first[1][0].send_signal(signal.SIGTERM)  # Only process 1 is told.
  for process, log in first:
    assert process.wait(timeout=600) == 0, open(log).read()[-3000:]
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
                 if n.isdigit())
  assert saved and saved[-1] < total  # Stopped early, at a step both processes saved.
  step_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(saved[-1]), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir))
  for process, log in start(portpicker.pick_unused_port(), total):
    assert process.wait(timeout=600) == 0, open(log).read()[-3000:]
  rows = metrics.read_metrics(workdir)
  assert [row["step"] for row in rows] == list(range(1, total + 1))
  for got, want in zip(_without_timing(rows), _without_timing(metrics.read_metrics(straight_run))):
    for key in got:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{key} at step {got['step']}")
