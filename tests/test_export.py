"""dora-export and the exported folder: PyTorch files in, runs out, equal outputs, one-line errors.

The PyTorch reference is a ViT written here with torch.nn in the layout of DINO's
`vision_transformer.py` (random weights, tiny size); tests that need torch skip without it. The
rules that pick a backbone out of a `.pth` object and the folder format are tested on numpy.
"""
import argparse
import importlib.util
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.cli import export as export_main
from dora_jax.models import vit
from dora_jax import pretrained
from dora_jax.pretrained import export
from dora_jax.pretrained import torch_checkpoint
from dora_jax import checkpoint
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, DEPTH, HEADS, PATCH, IMG = 32, 2, 4, 4, 16
SIZE_FLAGS = ["--variant", "S/16", "--dim", str(DIM), "--depth", str(DEPTH), "--num-heads",
              str(HEADS), "--patch-size", str(PATCH)]
OUTPUTS = ("cls", "tokens", "attn")


def _images(seed=0, batch=2, size=IMG):
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _numpy_weights(seed=0):
  """DINO-named random weights (float32 numpy, PyTorch layouts) of the tiny ViT."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=0.2: (scale * rng.standard_normal(shape)).astype(np.float32)
  weights = {
      "cls_token": normal(1, 1, DIM, scale=1.0),
      "pos_embed": normal(1, (IMG // PATCH) ** 2 + 1, DIM, scale=1.0),
      "patch_embed.proj.weight": normal(DIM, 3, PATCH, PATCH),
      "patch_embed.proj.bias": normal(DIM),
      "norm.weight": 1 + normal(DIM, scale=0.1),
      "norm.bias": normal(DIM, scale=0.1),
  }
  for i in range(DEPTH):
    for name, shape in (("norm1", (DIM,)), ("norm2", (DIM,)), ("attn.qkv", (3 * DIM, DIM)),
                        ("attn.proj", (DIM, DIM)), ("mlp.fc1", (4 * DIM, DIM)),
                        ("mlp.fc2", (DIM, 4 * DIM))):
      is_norm = name.startswith("norm")
      weights[f"blocks.{i}.{name}.weight"] = (1 if is_norm else 0) + normal(
          *shape, scale=0.1 if is_norm else 0.2)
      weights[f"blocks.{i}.{name}.bias"] = normal(shape[0], scale=0.1)
  return weights


@jax.jit
def _forward(graphdef, state, images):
  out = nnx.merge(graphdef, state)(images, num_last_blocks=DEPTH)
  return {name: out[name] for name in OUTPUTS + ("block_cls", "block_tokens")}


def _outputs(model, images):
  """The model's outputs as numpy (one compiled program for every model of the same graph)."""
  graphdef, state = nnx.split(model)
  return jax.tree.map(np.asarray, _forward(graphdef, state, jnp.asarray(images)))


def _run_cli(capsys, *argv):
  code = export_main.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _siblings(path):
  """Everything in the folder of `path` (temporary names included)."""
  return sorted(os.listdir(os.path.dirname(path)))


# ---- The PyTorch reference ViT (DINO's layout), built only when torch is installed. ----


def _torch_vit(torch):
  nn = torch.nn

  class Attention(nn.Module):

    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(DIM, 3 * DIM)
      self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
      batch, tokens, dim = x.shape
      qkv = self.qkv(x).reshape(batch, tokens, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      attn = ((q @ k.transpose(-2, -1)) * (dim // HEADS) ** -0.5).softmax(dim=-1)
      return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim)), attn

  class Mlp(nn.Module):

    def __init__(self):
      super().__init__()
      self.fc1, self.act, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
      return self.fc2(self.act(self.fc1(x)))

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1, self.attn = nn.LayerNorm(DIM, eps=1e-6), Attention()
      self.norm2, self.mlp = nn.LayerNorm(DIM, eps=1e-6), Mlp()

    def forward(self, x):
      y, attn = self.attn(self.norm1(x))
      x = x + y
      return x + self.mlp(self.norm2(x)), attn

  class PatchEmbed(nn.Module):

    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(3, DIM, kernel_size=PATCH, stride=PATCH)

  class VisionTransformer(nn.Module):
    """DINO's ViT at its training size (no position-embedding interpolation needed)."""

    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed()
      self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
      self.pos_embed = nn.Parameter(torch.zeros(1, (IMG // PATCH) ** 2 + 1, DIM))
      self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
      self.norm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, images_nhwc):
      x = self.patch_embed.proj(images_nhwc.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
      block_cls = []
      for block in self.blocks:
        x, attn = block(x)
        block_cls.append(self.norm(x)[:, 0])  # get_intermediate_layers(x, n=DEPTH)
      x = self.norm(x)
      return {"cls": x[:, 0], "tokens": x[:, 1:], "attn": attn,
              "block_cls": torch.stack(block_cls, dim=1)}

  return VisionTransformer()


def _torch_reference(torch, weights, images):
  model = _torch_vit(torch)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  with torch.no_grad():
    out = model(torch.from_numpy(images))
  return {name: value.numpy() for name, value in out.items()}


def _assert_close(outputs, reference, atol=1e-4):
  for name in OUTPUTS + ("block_cls",):
    np.testing.assert_allclose(outputs[name], reference[name], atol=atol, rtol=0, err_msg=name)


def _training_checkpoint(torch, teacher, student):
  """A DINO/DoRA training checkpoint: prefixed student/teacher, head, optimizer, epoch, args."""
  tensor = lambda v: torch.from_numpy(np.asarray(v, np.float32))
  head = {"head.mlp.0.weight": np.ones((8, DIM)), "head.last_layer.weight_g": np.ones((16, 1))}
  return {
      "student": {**{"module.backbone." + k: tensor(v) for k, v in student.items()},
                  **{"module." + k: tensor(v) for k, v in head.items()}},
      "teacher": {**{"backbone." + k: tensor(v) for k, v in teacher.items()},
                  **{k: tensor(v) for k, v in head.items()}},
      "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
      "epoch": 100,
      "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005),
      "dino_loss": {"center": torch.zeros(1, 16)},
  }


# ---- PyTorch file -> exported folder -> load_backbone. ----


def test_training_checkpoint_imports_teacher_and_student(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  teacher, student = _numpy_weights(0), _numpy_weights(1)
  file = str(tmp_path / "checkpoint.pth")
  torch.save(_training_checkpoint(torch, teacher, student), file)
  images = _images()

  for key, weights, flags in (("teacher", teacher, []), ("student", student, ["--key", "student"])):
    out = str(tmp_path / f"exported_{key}")
    code, stdout, stderr = _run_cli(capsys, "--torch-checkpoint", file, *SIZE_FLAGS, "--out", out,
                                    *flags)
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    description = json.load(open(os.path.join(out, export.DESCRIPTION_FILE)))
    assert description["variant"] is None  # The tiny size is not a named variant.
    assert (description["dim"], description["depth"], description["num_heads"],
            description["patch_size"], description["img_size"]) == (DIM, DEPTH, HEADS, PATCH, IMG)
    assert description["source"]["key"] == key and description["source"]["file"] == file
    backbone = pretrained.load_backbone(out)
    assert isinstance(backbone, vit.VisionTransformer)
    _assert_close(_outputs(backbone, images), _torch_reference(torch, weights, images))


def test_bare_state_dict(tmp_path, capsys):
  """A bare backbone file, as the published *_pretrain.pth files are."""
  torch = pytest.importorskip("torch")
  weights = _numpy_weights(3)
  file = str(tmp_path / "backbone.pth")
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, file)
  out = str(tmp_path / "exported")
  code, _, stderr = _run_cli(capsys, "--torch-checkpoint", file, *SIZE_FLAGS, "--out", out)
  assert code == 0, stderr
  assert json.load(open(os.path.join(out, export.DESCRIPTION_FILE)))["source"]["key"] is None
  images = _images(3)
  _assert_close(_outputs(pretrained.load_backbone(out), images),
                _torch_reference(torch, weights, images))


def test_variant_names():
  assert export.variant_name(vit.resolve_size("S/16")) == "S/16"
  assert export.variant_name(vit.resolve_size("B/8")) == "B/8"
  assert export.variant_name(vit.resolve_size("S/16", dim=48)) is None


def _error_cases(tmp_path, torch):
  teacher = _numpy_weights(0)
  good = str(tmp_path / "good.pth")
  torch.save(_training_checkpoint(torch, teacher, teacher), good)
  random_bytes = str(tmp_path / "random.pth")
  with open(random_bytes, "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  text = str(tmp_path / "notes.pth")
  with open(text, "w") as f:
    f.write("not a checkpoint\n")
  unsafe = str(tmp_path / "unsafe.pth")
  torch.save({"teacher": {"x": torch.zeros(1)}, "hook": np.random.default_rng(0)}, unsafe)
  wider = ["--variant", "S/16", "--dim", "48", "--depth", str(DEPTH), "--num-heads", str(HEADS),
           "--patch-size", str(PATCH)]
  return {
      "missing file": (["--torch-checkpoint", str(tmp_path / "nope.pth"), *SIZE_FLAGS],
                       "nope.pth does not exist"),
      "missing key": (["--torch-checkpoint", good, "--key", "ema", *SIZE_FLAGS],
                      "has no key 'ema'; its keys are ['student', 'teacher', 'optimizer', "
                      "'epoch', 'args', 'dino_loss']"),
      "wrong variant": (["--torch-checkpoint", good, *wider],
                        "do not match ViT of custom size (dim 48, depth 2, heads 4, patch 4): "
                        "blocks.0.attn.proj.bias: expected (48,), got (32,)"),
      "named variant": (["--torch-checkpoint", good, "--variant", "S/16"],
                        "do not match ViT S/16 (dim 384, depth 12, heads 6, patch 16): "),
      "random bytes": (["--torch-checkpoint", random_bytes, *SIZE_FLAGS],
                       "random.pth is not a PyTorch checkpoint"),
      "text file": (["--torch-checkpoint", text, *SIZE_FLAGS], "notes.pth is not a PyTorch "
                    "checkpoint"),
      "unsafe pickle": (["--torch-checkpoint", unsafe, *SIZE_FLAGS],
                        "which only an unsafe full unpickling would load"),
      "no variant": (["--torch-checkpoint", good], "--torch-checkpoint needs --variant"),
  }


def test_errors_are_one_line_and_write_nothing(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  cases = _error_cases(tmp_path, torch)
  before = _siblings(str(tmp_path / "out"))
  for name, (argv, expected) in cases.items():
    out = str(tmp_path / "out")
    code, stdout, stderr = _run_cli(capsys, *argv, "--out", out)
    assert code == 2, name
    assert stderr.count("\n") == 1 and stderr.startswith("dora-export: error: "), (name, stderr)
    assert expected in stderr, (name, stderr)
    assert not stdout and not os.path.exists(out), name
    assert _siblings(out) == before, name  # No temporary leftovers either.


def test_existing_output_is_refused(tmp_path, capsys):
  out = tmp_path / "exported"
  out.mkdir()
  code, _, stderr = _run_cli(capsys, "--torch-checkpoint", tmp_path / "x.pth", *SIZE_FLAGS,
                             "--out", out)
  assert code == 2 and "already exists" in stderr and os.listdir(out) == []


# ---- The selection rules and the folder format, without torch. ----


def test_backbone_state_dict_rules():
  weights = {"cls_token": np.zeros((1, 1, 4)), "blocks.0.norm1.weight": np.ones(4)}
  checkpoint = {"student": {"module.backbone." + k: v for k, v in weights.items()},
                "teacher": {"backbone." + k: v + 1 for k, v in weights.items()},
                "epoch": 3, "args": argparse.Namespace(lr=1)}
  picked, key = torch_checkpoint.backbone_state_dict(checkpoint)
  assert key == "teacher" and picked["backbone.cls_token"].dtype == np.float32
  np.testing.assert_array_equal(picked["backbone.blocks.0.norm1.weight"], 2 * np.ones(4))
  picked, key = torch_checkpoint.backbone_state_dict(checkpoint, "student")
  assert key == "student" and set(picked) == {"module.backbone." + k for k in weights}
  picked, key = torch_checkpoint.backbone_state_dict(weights)
  assert key is None and set(picked) == set(weights)

  error = torch_checkpoint.TorchCheckpointError
  with pytest.raises(error, match=r"has no key 'ema'; its keys are \['student', 'teacher', "
                     r"'epoch', 'args'\]"):
    torch_checkpoint.backbone_state_dict(checkpoint, "ema")
  with pytest.raises(error, match=r"\['epoch'\] is a int, not a state dict"):
    torch_checkpoint.backbone_state_dict(checkpoint, "epoch")
  with pytest.raises(error, match=r"no 'teacher' entry; pass --key with one of its state dicts "
                     r"\['model'\]"):
    torch_checkpoint.backbone_state_dict({"model": weights, "epoch": 1})
  with pytest.raises(error, match="is a bare state dict .* leave out --key"):
    torch_checkpoint.backbone_state_dict(weights, "teacher")
  with pytest.raises(error, match="holds a list, not a state dict"):
    torch_checkpoint.backbone_state_dict([1, 2])


def test_exported_folder_round_trip(tmp_path):
  model = vit.from_torch_state_dict(_numpy_weights(2), None, dim=DIM, depth=DEPTH,
                                    num_heads=HEADS, patch_size=PATCH)
  out = str(tmp_path / "exported")
  export.save_exported(model, out, {"kind": "test"})
  assert sorted(os.listdir(tmp_path)) == ["exported"]  # The temporary folder was renamed.
  loaded = pretrained.load_backbone(out)
  assert loaded.size == model.size and loaded.img_size == IMG
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(export.ExportError, match="already exists"):
    export.save_exported(model, out, {"kind": "test"})

  # A description that does not fit the parameters, or is not one, is a one-line error.
  description_file = os.path.join(out, export.DESCRIPTION_FILE)
  description = json.load(open(description_file))
  json.dump(dict(description, dim=2 * DIM, num_heads=HEADS), open(description_file, "w"))
  with pytest.raises(export.ExportError, match=r"do not match dora_backbone.json: \S+ has shape"):
    pretrained.load_backbone(out)
  json.dump(dict(description, depth="two"), open(description_file, "w"))
  with pytest.raises(export.ExportError, match='"depth" is \'two\'; expected a positive integer'):
    pretrained.load_backbone(out)


def test_last_blocks_cls_and_tokens():
  """`block_cls` / `block_tokens` of a depth-2 ViT: block 0's [CLS] and patch tokens are the
  outputs of a depth-1 ViT with the same first block, and the last entries are `cls`/`tokens`."""
  weights = _numpy_weights(4)
  deep = vit.from_torch_state_dict(weights, None, dim=DIM, depth=2, num_heads=HEADS,
                                   patch_size=PATCH)
  shallow = vit.from_torch_state_dict(
      {k: v for k, v in weights.items() if not k.startswith("blocks.1.")}, None, dim=DIM,
      depth=1, num_heads=HEADS, patch_size=PATCH)
  images = _images(5)
  out = _outputs(deep, images)
  assert out["block_cls"].shape == (2, 2, DIM)
  assert out["block_tokens"].shape == (2, 2) + out["tokens"].shape[1:]
  shallow_out = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x))(
      *nnx.split(shallow), images)
  np.testing.assert_allclose(out["block_cls"][:, 0], shallow_out["cls"], atol=1e-6)
  np.testing.assert_allclose(out["block_tokens"][:, 0], shallow_out["tokens"], atol=1e-6)
  np.testing.assert_array_equal(out["block_cls"][:, 1], out["cls"])
  np.testing.assert_array_equal(out["block_tokens"][:, 1], out["tokens"])
  graphdef, state = nnx.split(deep)
  abstract = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
  assert "block_cls" not in abstract and "block_tokens" not in abstract
  with pytest.raises(ValueError, match="num_last_blocks=3 must be in"):
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, num_last_blocks=3), state, images)


# ---- A dora-train run -> exported folder and a PyTorch state dict. ----


def _load_config(path):
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """(work folder, its teacher's ViT built in memory): a dora-train work folder with one
  checkpoint (step 5) of a tiny model, written through the trainer's own Checkpointer (random
  teacher and student: the export must pick the teacher, which the tests compare with the
  teacher held here, not with one loaded back from the same files)."""
  config = _load_config(os.path.join(ROOT, "configs", "demo.py"))
  config.model.update(dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, out_dim=16,
                      head_hidden_dim=16, head_bottleneck_dim=8)
  config.data.global_size = IMG
  # The state's shapes without compiling anything, filled with random values.
  graphdef, abstract = train_step.abstract_train_state(config, plan_lib.TrainPlan.from_config(config))
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda leaf: (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
      if jnp.issubdtype(leaf.dtype, jnp.floating) else np.zeros(leaf.shape, leaf.dtype), abstract)
  workdir = str(tmp_path_factory.mktemp("run"))
  manager = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=1)
  manager.save(5, state, {"position": 0})
  manager.wait_until_finished()
  manager.close()
  checkpoint.write_config(workdir, config)
  return workdir, train_step.teacher_backbone(graphdef, jax.tree.map(jnp.asarray, state))


def test_run_exports_its_teacher(saved_run, tmp_path, capsys):
  run_dir, teacher = saved_run
  out = str(tmp_path / "exported")
  code, _, stderr = _run_cli(capsys, "--checkpoint", run_dir, "--out", out)
  assert code == 0, stderr
  source = json.load(open(os.path.join(out, export.DESCRIPTION_FILE)))["source"]
  assert source == {"kind": "dora-train", "checkpoint": run_dir, "step": 5}
  images = _images(6)
  expected = _outputs(teacher, images)
  exported = _outputs(pretrained.load_backbone(out), images)
  for name in expected:
    np.testing.assert_array_equal(exported[name], expected[name])
  # A step folder works the same; a folder that is no run is refused, writing nothing.
  step_out = str(tmp_path / "from_step")
  assert _run_cli(capsys, "--checkpoint", os.path.join(run_dir, "checkpoints", "5"),
                  "--out", step_out)[0] == 0
  code, _, stderr = _run_cli(capsys, "--checkpoint", str(tmp_path), "--out", tmp_path / "x")
  assert code == 2 and "is not a dora-train work folder" in stderr
  assert not os.path.exists(tmp_path / "x")


def test_load_backbone_reads_the_teacher_once_and_nothing_else(saved_run, monkeypatch):
  """One orbax read, of the teacher's arrays only (verified against their checksums on the way),
  gives the teacher the run saved."""
  from dora_jax.checkpoint import manager  # pylint: disable=g-import-not-at-top
  run_dir, teacher = saved_run
  reads = []
  restore = manager.ocp.CheckpointManager.restore

  def counted(self, step, *args, **kwargs):
    restored = restore(self, step, *args, **kwargs)
    reads.append(restored["state"])
    return restored

  monkeypatch.setattr(manager.ocp.CheckpointManager, "restore", counted)
  loaded = pretrained.load_backbone(run_dir)
  assert len(reads) == 1 and list(reads[0]) == ["teacher"]
  images = _images(3)
  expected, got = _outputs(teacher, images), _outputs(loaded, images)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])


def test_run_to_pytorch_loads_strictly_with_equal_outputs(saved_run, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  run_dir, teacher = saved_run
  out, pth = str(tmp_path / "exported"), str(tmp_path / "teacher.pth")
  code, stdout, stderr = _run_cli(capsys, "--checkpoint", run_dir, "--out", out, "--torch-out",
                                  pth)
  assert code == 0, stderr
  assert pth in stdout and sorted(os.listdir(tmp_path)) == ["exported", "teacher.pth"]
  state_dict = torch.load(pth, weights_only=True)  # Plain tensors: the default safe loader.
  model = _torch_vit(torch)
  model.load_state_dict(state_dict, strict=True)
  images = _images(7)
  with torch.no_grad():
    reference = {k: v.numpy() for k, v in model(torch.from_numpy(images)).items()}
  _assert_close(_outputs(teacher, images), reference)
  # An existing --torch-out is refused before anything is written.
  code, _, stderr = _run_cli(capsys, "--checkpoint", run_dir, "--out", tmp_path / "again",
                             "--torch-out", pth)
  assert code == 2 and "already exists" in stderr and not os.path.exists(tmp_path / "again")
