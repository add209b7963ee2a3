"""dora-finetune: linear probe and fine-tuning runs (loss falls, exact resume), the optimisers
against NumPy float64, the image sources and views, the demo's crops, one-line errors; the
command's guarantees from the loop it shares with dora-train (no input worker outlives a SIGKILL,
Ctrl-C exits 130 keeping its checkpoints, a work folder in a cloud bucket).

The runs train a tiny exported ViT (dim 32, depth 2, 4-px patches) on 16-px views of a small
image folder the test makes (three colour classes), for 12 steps of 8 images over 4 fake devices.
"""
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import psutil
import pytest

from dora_jax.cli import finetune as finetune_cli
from dora_jax.data import images as images_lib
from dora_jax.finetune import checks
from dora_jax.finetune import config_base
from dora_jax.finetune import data as data_lib
from dora_jax.finetune import demo_data
from dora_jax.finetune import model as model_lib
from dora_jax.finetune import train
from dora_jax.models import vit
from dora_jax import pretrained
from dora_jax.pretrained import export
from dora_jax import checkpoint
from dora_jax.checkpoint import checksums
from dora_jax.trainer import metrics
from dora_jax.cli import runner
from dora_jax.trainer import sharding
import dora_runs
from dora_runs import set_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("blue", "green", "red")  # Sorted: the labels are 0, 1, 2.
TOTAL_STEPS = 12  # 48 training images / batch 8 = 6 steps per epoch: 2 epochs.
INTERRUPT_AFTER = 4  # SIGTERM while logging step 4: the run saves step 5 and stops (mid-epoch).


def _make_image_folder(root, per_class, seed):
  rng = np.random.default_rng(seed)
  channel = {"red": 0, "green": 1, "blue": 2}
  for name in CLASSES:
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      pixels = rng.integers(0, 90, (36 + i % 3 * 4, 44, 3)).astype(np.uint8)
      pixels[..., channel[name]] += 140
      Image.fromarray(pixels).save(os.path.join(root, name, f"{i:03d}.png"))
  return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  return {"train": _make_image_folder(str(root / "train"), 16, 0),
          "val": _make_image_folder(str(root / "val"), 6, 1)}


def _tiny_vit(seed=0, **size):
  """A ViT with random NumPy weights (norm scales near 1); nothing to compile."""
  abstract = nnx.eval_shape(lambda: vit.VisionTransformer(None, rngs=nnx.Rngs(0), **size))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    offset = 1.0 if jax.tree_util.keystr(path).endswith("'scale']") else 0.0
    return jnp.asarray(offset + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """A tiny exported ViT with random weights."""
  model = _tiny_vit(dim=32, depth=2, num_heads=4, patch_size=4, img_size=16)
  path = str(tmp_path_factory.mktemp("backbone") / "exported")
  export.save_exported(model, path, {"kind": "test"})
  return path


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs of one mode compile the same programs: compile them once (restored afterwards)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  values = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)
  for name, value in zip(names, values):
    jax.config.update(name, value)
  yield
  for name, value in previous.items():
    jax.config.update(name, value)


def _config(images, backbone, mode, **overrides):
  c = config_base.get_base_config()
  c.mode = mode
  c.backbone.path = backbone
  c.data.train, c.data.val = images["train"], images["val"]
  c.data.image_size = 16
  c.data.crop_scale = (0.5, 1.0)
  c.data.num_workers = 0
  c.data.num_threads = 1
  c.batch_size = 8
  c.total_steps = TOTAL_STEPS
  c.log_every_steps = 1
  c.linear.num_last_blocks = 2
  c.linear.avgpool = True
  c.optim.base_lr = 2.0 if mode == "linear" else 0.5
  c.optim.warmup_epochs = 0 if mode == "linear" else 0.5
  c.optim.weight_decay = 0.0 if mode == "linear" else 0.05
  for key, value in overrides.items():
    set_key(c, key.replace("__", "."), value)
  return c


def _final_state(workdir, config):
  """The state of the latest checkpoint in `workdir` (restored onto the host)."""
  data = checks.prepare_data(config, workdir)
  steps_per_epoch = len(data["train"]) // config.batch_size
  recipe = train.make_recipe(config, num_classes=len(CLASSES), steps_per_epoch=steps_per_epoch,
                             total_steps=config.total_steps)
  _, params, size = train.load_initial_backbone(config, recipe)
  optimizer = model_lib.make_optimizer(recipe, size.depth)
  abstract = jax.eval_shape(
      lambda p, r: train.init_state(recipe, optimizer, model_lib.feature_dim(size.dim, recipe),
                                    p, r), params, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh(config.mesh)
  abstract = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))
  manager = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=5)
  step = manager.latest_step()
  state, data_state = manager.restore(step, abstract)
  manager.close()
  return step, jax.device_get(state), data_state, jax.device_get(params)


TIMING = ("images_per_second", "step_time", "compile_time", "tflops", "mfu")


def _without_timing(rows):
  return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("mode,init", [("linear", "pretrained"), ("full", "random")])
def test_run_learns_and_resumes_exactly(images, backbone, mode, init, tmp_path, monkeypatch):
  config = _config(images, backbone, mode, backbone__init=init)
  straight = str(tmp_path / "straight")
  results = train.run(config, straight)
  assert results["steps"] == TOTAL_STEPS and results["val_accuracy"] is not None
  assert json.load(open(os.path.join(straight, train.RESULTS_FILE))) == results
  rows = metrics.read_metrics(straight)
  losses = [row["loss"] for row in rows if "loss" in row]
  assert len(losses) == TOTAL_STEPS
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
  validations = [row for row in rows if "val_accuracy" in row]
  assert [row["step"] for row in validations] == [6, 12]  # Every epoch.
  assert validations[-1]["val_accuracy"] > 0.6  # Three colours: chance is 1/3.

  # The same run, interrupted by SIGTERM after step INTERRUPT_AFTER, then the same call again.
  resumed = str(tmp_path / "resumed")
  write_scalars = metrics.MetricWriter.write_scalars

  def write_and_signal(self, step, scalars):
    write_scalars(self, step, scalars)
    if step == INTERRUPT_AFTER and "loss" in scalars:
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch:
    patch.setattr(metrics.MetricWriter, "write_scalars", write_and_signal)
    interrupted = train.run(config, resumed)
  assert interrupted["steps"] == 0 and not os.path.exists(os.path.join(resumed, "results.json"))
  assert os.listdir(os.path.join(resumed, checkpoint.CHECKPOINT_DIR)) == [
      str(INTERRUPT_AFTER + 1)]
  assert train.run(config, resumed) == results

  step_a, state_a, data_a, initial = _final_state(straight, config)
  step_b, state_b, data_b, _ = _final_state(resumed, config)
  assert step_a == step_b == TOTAL_STEPS and data_a == data_b
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)  # Bitwise.
  assert _without_timing(metrics.read_metrics(straight)) == _without_timing(
      metrics.read_metrics(resumed))
  # The linear probe leaves the backbone as it was; fine-tuning changes every parameter.
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state_a["backbone"]),
                                                      jax.tree.leaves(initial))]
  assert (not any(changed)) if mode == "linear" else all(changed)
  # The run started from the exported weights, or from a fresh ViT of the same shape.
  exported = jax.tree.leaves(nnx.state(pretrained.load_backbone(backbone)))
  same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial), exported)]
  assert len(same) == len(exported) and (all(same) if init == "pretrained" else not any(same))

  # A fine-tuning checkpoint (its optimizer state holds lists) is read and verified like a
  # dora-train one: the same arrays as the restore above; damage is an error, not wrong weights.
  step_c, state_c = checkpoint.read_state(checkpoint.checkpoint_dir(straight))
  assert step_c == TOTAL_STEPS
  assert checksums.array_record(state_c) == checksums.array_record(state_a)
  step_dir = os.path.join(checkpoint.checkpoint_dir(straight), str(TOTAL_STEPS))
  for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    data = bytearray(open(path, "rb").read())
    for i in range(100, len(data), 256):
      data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=f"checkpoint {TOTAL_STEPS} in {checkpoint.checkpoint_dir(straight)} "
                           "is damaged: "):
    checkpoint.read_state(checkpoint.checkpoint_dir(straight))


# ---- The optimisers against NumPy float64. ----


def _tiny_params(rng):
  """{"backbone": the nnx.State of a 2-block ViT, "head": a dict}, as the fine-tuning state."""
  _, backbone = nnx.split(_tiny_vit(seed=int(rng.integers(100)), dim=4, depth=2, num_heads=2,
                                    patch_size=2, img_size=4))
  return {"backbone": backbone,
          "head": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)}}


def _name(path):
  """'blocks/0/attn/qkv/kernel' (backbone) or 'head/kernel' of a state path."""
  names = [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]
  names = [name for name in names if name != "value"]  # nnx.Variable's value.
  return "/".join(names[1:]) if names[0] == "backbone" else "/".join(names)


def _recipe(mode, **kw):
  values = dict(mode=mode, num_classes=3, num_last_blocks=1, avgpool=False, peak_lr=0.1,
                min_lr=0.01, warmup_steps=0, total_steps=4, momentum=0.9, weight_decay=0.05,
                layer_decay=0.5, label_smoothing=0.0, drop_path_rate=0.0)
  values.update(kw)
  return model_lib.Recipe(**values)


def _cosine(recipe, step):
  return recipe.min_lr + 0.5 * (recipe.peak_lr - recipe.min_lr) * (
      1 + np.cos(np.pi * step / recipe.total_steps))


def _run_optimizer(optimizer, params, grads):
  """`len(grads)` updates of float32 `params`, as one compiled program."""

  @jax.jit
  def run(params, grads):
    opt_state = optimizer.init(params)
    for g in grads:
      updates, opt_state = optimizer.update(g, opt_state, params)
      params = jax.tree.map(jnp.add, params, updates)
    return params

  return run(*jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (params, grads)))


def test_adamw_with_layer_decay_matches_numpy():
  rng = np.random.default_rng(0)
  params = _tiny_params(rng)
  grads = [jax.tree.map(lambda p: rng.standard_normal(np.shape(p)), params) for _ in range(2)]
  recipe = _recipe("full")
  result = _run_optimizer(model_lib.make_optimizer(recipe, depth=2), params, grads)

  # Layer l of L = depth + 1 = 3 has lr factor 0.5 ** (3 - l).
  scale = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed": 0.125, "blocks/0": 0.25,
           "blocks/1": 0.5, "norm": 1.0, "head": 1.0}
  decayed = {"patch_embed/kernel", "head/kernel"} | {
      f"blocks/{i}/{layer}/kernel" for i in (0, 1)
      for layer in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")}

  def reference(path, p, g1, g2):
    name = _name(path)
    factor = next(v for k, v in scale.items() if name.startswith(k))
    wd = recipe.weight_decay if name in decayed else 0.0
    p, m, v = np.asarray(p, np.float64), 0.0, 0.0
    for t, g in enumerate((g1, g2), start=1):
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * g * g
      adam = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
      p = p - _cosine(recipe, t - 1) * factor * (adam + wd * p)
    return p

  expected = dict(jax.tree_util.tree_flatten_with_path(
      jax.tree_util.tree_map_with_path(reference, params, *grads))[0])
  leaves = jax.tree_util.tree_flatten_with_path(result)[0]
  assert {_name(path) for path, _ in leaves} >= decayed | {"cls_token", "pos_embed"}
  for path, value in leaves:
    np.testing.assert_allclose(value, expected[path], rtol=2e-5, atol=1e-5, err_msg=_name(path))


def test_sgd_with_momentum_matches_numpy():
  rng = np.random.default_rng(1)
  head = {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)}
  grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape), head) for _ in range(3)]
  recipe = _recipe("linear")
  result = _run_optimizer(model_lib.make_optimizer(recipe, depth=2), head, grads)
  for name in head:
    p, buffer = head[name], 0.0
    for t, g in enumerate(grads):
      buffer = 0.9 * buffer + g[name]  # PyTorch's SGD momentum: no dampening, no decay.
      p = p - _cosine(recipe, t) * buffer
    np.testing.assert_allclose(result[name], p, rtol=2e-5, atol=1e-5)


def test_warmup_then_cosine():
  recipe = _recipe("full", warmup_steps=2, total_steps=6)
  schedule = model_lib.learning_rate(recipe)
  lrs = np.array([float(schedule(step)) for step in range(7)])
  progress = (np.arange(7) - 2) / 4
  expected = np.where(np.arange(7) < 2, 0.1 * np.arange(7) / 2,
                      0.01 + 0.045 * (1 + np.cos(np.pi * np.clip(progress, 0, 1))))
  np.testing.assert_allclose(lrs, expected, rtol=1e-6)


def test_linear_probe_features():
  """[CLS] of the last n blocks, then the mean patch token: F = D * (n + 1)."""
  model = _tiny_vit(dim=8, depth=3, num_heads=2, patch_size=4, img_size=8)
  images = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  recipe = _recipe("linear", num_last_blocks=2, avgpool=True)
  graphdef, state = nnx.split(model)
  feats, out = jax.jit(lambda state, images: (
      model_lib.features(nnx.merge(graphdef, state), images, recipe),
      nnx.merge(graphdef, state)(images, num_last_blocks=3)))(state, images)
  assert feats.shape == (2, 8 * 3) == (2, model_lib.feature_dim(8, recipe))
  np.testing.assert_allclose(feats[:, :8], out["block_cls"][:, 1], atol=1e-6)
  np.testing.assert_allclose(feats[:, 8:16], out["cls"], atol=1e-6)
  np.testing.assert_allclose(feats[:, 16:], out["tokens"].mean(axis=1), atol=1e-6)


# ---- Sources and views. ----


def test_image_folder_views_and_padded_validation(images):
  source = images_lib.ImageFolder(images["train"])
  assert source.class_names == CLASSES and len(source) == 48
  assert [source[i]["label"] for i in (0, 16, 47)] == [0, 1, 2]
  first = source[0]["image"]
  assert first.dtype == np.uint8 and first.shape == (36, 44, 3)

  config = data_lib.ViewConfig(image_size=16, crop_scale=(0.5, 1.0), val_crop_fraction=0.5)
  # Validation: short side to 16 / 0.5 = 32, then the central 16 x 16.
  picture = np.zeros((40, 80, 3), np.uint8)
  picture[:, 36:44] = 255  # A white bar in the middle of the image.
  view = data_lib.center_view(picture, config)
  assert view.shape == (16, 16, 3)
  assert view[:, 6:10].min() > 200 and view[:, :4].max() < 30 and view[:, -4:].max() < 30
  # Training views are a function of the rng.
  train_view = data_lib.TrainView(config)
  a = train_view(source[5], np.random.default_rng(3))
  b = train_view(source[5], np.random.default_rng(3))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (16, 16, 3) and a["label"] == 0

  # Validation over 2 hosts, batch 4 (2 per host): every image exactly once, padding invalid.
  val = images_lib.ImageFolder(images["val"])
  seen = []
  counts = []
  for host in range(2):
    batches = list(data_lib.eval_batches(val, config, global_batch_size=4, process_index=host,
                                         process_count=2))
    counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape == (2, 16, 16, 3)
      seen += [int(label) for label, valid in zip(batch["label"], batch["valid"]) if valid]
  assert counts == [5, 5]  # 18 images, 9 per host, 2 per batch: 5 batches each.
  assert sorted(seen) == sorted(val[i]["label"] for i in range(len(val)))


def test_tfds_source_reads_without_tensorflow_pipelines():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = images_lib.open_source("tfds:mnist:train")
    assert len(source) == 6 and len(source.class_names) == 10
    element = source[2]
    assert element["image"].shape == (28, 28, 3) and 0 <= element["label"] < 10
  with pytest.raises(ValueError, match="expected tfds:NAME:SPLIT"):
    images_lib.open_source("tfds:mnist")


def test_demo_crop_box_holds_the_object():
  rng = np.random.default_rng(0)
  for _ in range(20):
    mask = np.zeros((60, 90), bool)
    top, left = rng.integers(0, 50), rng.integers(0, 80)
    mask[top:top + rng.integers(3, 30), left:left + rng.integers(3, 30)] = True
    x0, y0, x1, y1 = demo_data._square_box(mask)
    ys, xs = np.nonzero(mask)
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 90 and y1 <= 60
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


# ---- Bad input. ----


def test_bad_input_is_a_one_line_error_and_writes_nothing(images, backbone, tmp_path):
  other = _make_image_folder(str(tmp_path / "other"), 2, 0)
  os.rename(os.path.join(other, "red"), os.path.join(other, "yellow"))
  empty = tmp_path / "empty_class"
  (empty / "a").mkdir(parents=True)
  cases = {
      "config backbone.path: ": dict(backbone__path=str(tmp_path / "nowhere")),
      "has classes ['blue', 'green', 'red'] but data.val": dict(data__val=other),
      "empty_class/a has no images": dict(data__val=str(empty)),
      "fewer than one batch": dict(batch_size=64),
      "config mode='probe'": dict(mode="probe"),
      "does not divide over the 4 devices": dict(batch_size=6),
      "config data.crop_scale=(0.5, 0.2)": dict(data__crop_scale=(0.5, 0.2)),
  }
  for expected, overrides in cases.items():
    mode = overrides.pop("mode", "linear")
    config = _config(images, backbone, "linear", **overrides)
    config.mode = mode
    workdir = str(tmp_path / "run")
    with pytest.raises(checks.ConfigError) as raised:
      train.train_and_evaluate(config, workdir)
    assert expected in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    assert not os.path.exists(workdir)


def test_command_line_error(backbone, tmp_path):
  """dora-finetune names itself and the fine-tuning config keys in its one-line errors."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  process = subprocess.run(
      [sys.executable, "-m", "dora_jax.cli.finetune", "--config",
       os.path.join(ROOT, "configs", "finetune_linear.py"), "--workdir", str(tmp_path / "w"),
       "--config.optim.base_lrr=1"], capture_output=True, text=True, env=env, timeout=120)
  assert process.returncode == 2
  lines = process.stderr.strip().splitlines()
  assert lines[-1].startswith("dora-finetune: error: unknown config key 'base_lrr'"), lines
  assert "dora_jax/finetune/config_base.py" in lines[-1]


# ---- The command's guarantees (the loop and runner shared with dora-train). ----


def _start_command(images, backbone, tmp_path, env, **overrides):
  """dora-finetune as a process, on a long linear probe (it runs until stopped); (process,
  workdir, config).

  The config travels as a config file that returns it, so that no key is spelled twice.
  """
  config = _config(images, backbone, "linear", total_steps=100_000, **overrides)
  config_file = tmp_path / "config.py"
  config_file.write_text(
      "import json\nimport ml_collections\n\n\ndef get_config(arg=None):\n"
      f"  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
  workdir = str(tmp_path / "run")
  process = subprocess.Popen(
      [sys.executable, "-m", "dora_jax.cli.finetune", "--config", str(config_file), "--workdir",
       workdir], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return process, workdir, config


def _wait_for(condition, process, what, timeout=240):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      pytest.fail(f"dora-finetune ended before {what}: {process.stderr.read()[-3000:]}")
    assert time.monotonic() < deadline, f"no {what} after {timeout} s"
    time.sleep(0.2)


def _alive(process: psutil.Process) -> bool:
  """Running (a zombie waiting for PID 1 to reap it has exited: it holds no memory)."""
  try:
    return process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def test_no_input_worker_outlives_a_sigkill(images, backbone, tmp_path, env):
  process, workdir, _ = _start_command(images, backbone, tmp_path, env, data__num_workers=2)
  descendants = []
  try:
    # A metrics record: the input iterator, and so its workers, run.
    _wait_for(lambda: metrics.read_metrics(workdir), process, "metrics record")
    descendants = psutil.Process(process.pid).children(recursive=True)
    workers = [p for p in descendants if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) >= 2, [p.cmdline() for p in descendants]  # data.num_workers=2
    os.kill(process.pid, signal.SIGKILL)  # No atexit, no finaliser, no signal handler runs.
    process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in descendants) and time.monotonic() < deadline:
      time.sleep(0.2)
    left = [(p.pid, p.cmdline()) for p in descendants if _alive(p)]
    assert not left, f"still running after dora-finetune was killed: {left}"
  finally:
    for child in descendants:  # Only what this test started; orphans would hold the pipes.
      if _alive(child):
        child.kill()
    process.kill()
    process.communicate(timeout=60)


def test_ctrl_c_exits_130_and_keeps_an_intact_checkpoint(images, backbone, tmp_path, env):
  process, workdir, config = _start_command(images, backbone, tmp_path, env,
                                            checkpoint_every_steps=2)
  checkpoint_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  saved = lambda: [int(name) for name in (os.listdir(checkpoint_dir) if os.path.isdir(
      checkpoint_dir) else []) if name.isdigit()]  # orbax renames a step's folder when done.
  try:
    _wait_for(saved, process, "checkpoint")
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  log = os.path.join(workdir, finetune_cli.PROGRAM.log_file)
  assert process.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      "dora-finetune: error: interrupted (Ctrl-C); run the same command again to resume from the "
      f"last checkpoint. (details: {log})")
  assert "KeyboardInterrupt" in open(log).read()
  # Ctrl-C is handled at a step boundary: that step is saved (never a save cut in half).
  reported = re.findall(r"Ctrl-C: saved step (\d+)", stderr)
  assert len(reported) == 1, stderr[-3000:]
  steps = saved()
  assert int(reported[0]) == max(steps), (reported, steps)
  # The latest restores, each array checked against its checksum (damage raises).
  step, state, _, _ = _final_state(workdir, config)
  assert step == max(steps) == int(state["step"])


BUCKET = dora_runs.BUCKET


def test_work_folder_in_a_bucket(images, backbone, tmp_path, monkeypatch):
  """Everything but the checkpoints (orbax writes URLs itself; here they go to a local folder)
  reaches the bucket through dora_jax.paths: config, metrics, results, the log file; the same
  command again resumes from the bucket and reports the same results."""
  root = tmp_path / "bucket"
  root.mkdir()
  monkeypatch.setattr(metrics.tensorboardX, "SummaryWriter", dora_runs.NoTensorBoard)
  orbax_folders = []
  open_checkpointer = checkpoint.Checkpointer.__init__

  def checkpointer_on_disk(self, directory, **kwargs):
    orbax_folders.append(directory)
    open_checkpointer(self, str(root / directory[len(BUCKET) + 1:]), **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", checkpointer_on_disk)
  config = _config(images, backbone, "linear")
  workdir = f"{BUCKET}/probe"
  with dora_runs.fake_bucket(str(root), local_paths=True) as opened:
    results = train.run(config, workdir)
    assert train.run(config, workdir) == results  # Resumed at the end: nothing left to train.
    monkeypatch.setattr(flags.FLAGS["workdir"], "value", workdir)
    monkeypatch.setattr(flags.FLAGS["verbose"], "value", False)
    log = runner.write_log(finetune_cli.PROGRAM, RuntimeError("lost the bucket"))
  assert results["steps"] == TOTAL_STEPS and results["val_accuracy"] > 0.6
  assert orbax_folders == [f"{workdir}/{checkpoint.CHECKPOINT_DIR}"] * 2
  local = root / "probe"
  assert json.loads((local / train.RESULTS_FILE).read_text()) == results
  assert json.loads((local / checkpoint.FINETUNE_CONFIG_FILE).read_text())["mode"] == "linear"
  rows = [json.loads(line) for line in (local / metrics.METRICS_FILE).read_text().splitlines()]
  assert [row["step"] for row in rows] == list(range(1, TOTAL_STEPS + 1))
  assert log == f"{workdir}/{finetune_cli.PROGRAM.log_file}"
  assert "RuntimeError: lost the bucket" in (local / finetune_cli.PROGRAM.log_file).read_text()
  for name in (metrics.METRICS_FILE, train.RESULTS_FILE, checkpoint.FINETUNE_CONFIG_FILE):
    assert f"{workdir}/{name}" in opened
  assert sorted(os.listdir(local / checkpoint.CHECKPOINT_DIR)) == ["12", "6"]


# ---- Configs. ----


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    keys |= _flat_keys(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
  return keys


@pytest.mark.parametrize("name", ["finetune_linear", "finetune_full", "finetune_demo"])
def test_configs_document_their_command_and_use_base_keys(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert f"dora-finetune --config configs/{name}.py" in module.__doc__
  base = _flat_keys(config_base.get_base_config())
  assert _flat_keys(module.get_config()) == base
  with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
    module.get_config("bogus=1")
  if name == "finetune_demo":
    assert module.get_config("full").mode == "full"
    assert module.get_config().backbone.path == "workdirs/demo"


def test_every_base_key_has_a_comment():
  # The keys shared with dora-train are declared (and commented) in dora_jax/config_base.py.
  source = "".join(open(os.path.join(ROOT, "dora_jax", *path)).read()
                   for path in (("finetune", "config_base.py"), ("config_base.py",)))
  for key in _flat_keys(config_base.get_base_config()):
    line = re.search(rf"^\s*c\.{re.escape(key)} = .*$", source, re.MULTILINE)
    assert line and "#" in line.group(0), f"base key {key} has no one-line comment"


@pytest.mark.skipif(not os.environ.get("DORA_SLOW_TESTS"),
                    reason="the demo pretraining and fine-tuning take ~8 minutes; set DORA_SLOW_TESTS=1")
def test_demo_commands(tmp_path):
  """The README's demo: dora-train's demo backbone, then configs/finetune_demo.py (both probes
  well above the 1/3 of chance, and the comparison written)."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)  # One CPU device, as on a laptop.
  pretrain = str(tmp_path / "demo")
  for module, config, workdir in (
      ("dora_jax.cli.train", "configs/demo.py", pretrain),
      ("dora_jax.cli.finetune", f"configs/finetune_demo.py:backbone={pretrain}",
       str(tmp_path / "finetune"))):
    process = subprocess.run([sys.executable, "-m", module, "--config", config, "--workdir",
                              workdir], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=1800)
    assert process.returncode == 0, process.stderr[-3000:]
  comparison = json.load(open(tmp_path / "finetune" / train.COMPARISON_FILE))
  assert set(comparison) == {"pretrained", "random"}
  assert all(result["val_accuracy"] > 0.5 for result in comparison.values())
