"""A PyTorch twin of the DoRA train step, to time it beside ours in one process (issue 9).

The public DoRA code cannot run here (its torchvision does not install beside the CPU torch
build), so `benchmarks/train_step.py --torch` times this stand-in instead: the same step as the
public code's in eager PyTorch, written for this benchmark from the model's description (DINO's
ViT and head, the DoRA keep step), with the same shapes and amounts of work:

- teacher: ViT forward (no grad) on the B*T frames, keeping the last block's attention, queries
  and keys; the DINO head on the [CLS] tokens;
- objects: k random heads' [CLS] attention pools the queries into prototypes, 3 Sinkhorn-Knopp
  iterations at the public code's scale, one cross-attention against the keys, a cut at the
  batch mean, k masked copies of each frame ("keep");
- student: ViT forward+backward with drop path 0.1 on the B*T*k masked views (224 px) and, as
  DINO's MultiCropWrapper does, on the B*T*M local crops (112 px, position embeddings
  interpolated bicubically) as a second backbone call, then one head call on all [CLS] tokens;
- loss: DINO's cross-entropy (teacher temperature 0.04 after centring, student 0.1) of each
  frame's teacher target against that frame's views and crops;
- update: per-tensor gradient clipping at 3.0, the last layer's gradient dropped (first epoch,
  as ours in the benchmark), torch.optim.AdamW, the teacher's EMA by a loop over the parameters.

Nothing here is imported by the package; only the benchmark uses it, and only when torch is
installed (`pip install -e '.[torch]'`).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class _Block(nn.Module):

  def __init__(self, dim: int, heads: int, drop_path: float):
    super().__init__()
    self.heads, self.drop_path = heads, drop_path
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, 4 * dim)
    self.fc2 = nn.Linear(4 * dim, dim)

  def _drop(self, x):
    if not self.training or self.drop_path == 0:
      return x
    keep = 1.0 - self.drop_path
    mask = torch.empty((x.shape[0], 1, 1)).bernoulli_(keep)
    return x * mask / keep

  def forward(self, x, keep_qk: bool = False):
    b, n, c = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    y = self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    x = x + self._drop(y)
    x = x + self._drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
    return (x, attn, q, k) if keep_qk else x


class _ViT(nn.Module):

  def __init__(self, dim: int, depth: int, heads: int, patch: int, image: int,
               drop_path: float):
    super().__init__()
    self.patch = patch
    self.patch_embed = nn.Conv2d(3, dim, patch, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
    rates = np.linspace(0, drop_path, depth)
    self.blocks = nn.ModuleList(_Block(dim, heads, float(r)) for r in rates)
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def _pos(self, grid: int):
    own = int(math.sqrt(self.pos_embed.shape[1] - 1))
    if grid == own:
      return self.pos_embed
    patches = self.pos_embed[:, 1:].reshape(1, own, own, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([self.pos_embed[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

  def forward(self, images, keep_qk: bool = False):
    x = self.patch_embed(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + self._pos(images.shape[-1] // self.patch)
    for block in self.blocks[:-1]:
      x = block(x)
    if keep_qk:
      x, attn, q, k = self.blocks[-1](x, keep_qk=True)
      return self.norm(x)[:, 0], attn, q, k
    return self.norm(self.blocks[-1](x))[:, 0]


class _Head(nn.Module):

  def __init__(self, dim: int, out_dim: int, hidden: int, bottleneck: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                             nn.GELU(), nn.Linear(hidden, bottleneck))
    bound = bottleneck ** -0.5
    self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck).uniform_(-bound, bound))
    self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=False)  # norm_last_layer

  def forward(self, x):
    x = F.normalize(self.mlp(x), dim=-1)
    weight = self.last_g * self.last_v / self.last_v.norm(dim=1, keepdim=True)  # weight norm
    return F.linear(x, weight)


class _Model(nn.Module):

  def __init__(self, size, image: int, out_dim: int, hidden: int, bottleneck: int,
               drop_path: float):
    super().__init__()
    self.backbone = _ViT(size.dim, size.depth, size.num_heads, size.patch_size, image, drop_path)
    self.head = _Head(size.dim, out_dim, hidden, bottleneck)


def _sinkhorn(scores, iterations: int):
  """(k, N) similarities / eps -> the plan scaled so each patch's column sums to one."""
  q = torch.exp(scores - scores.max())
  k, n = q.shape
  for _ in range(iterations):
    q = q / q.sum(dim=1, keepdim=True) / k
    q = q / q.sum(dim=0, keepdim=True) / n
  return q * n


def _object_views(frames, attn, q, k, num_objects: int, patch: int):
  """frames (B, T, 3, H, W); the teacher's last-block attention (BT, h, N+1, N+1), q, k
  (BT, h, N+1, d) -> (B*T*k, 3, H, W): each frame keeping one tracked object."""
  b, t = frames.shape[:2]
  heads = torch.randperm(attn.shape[1])[:num_objects]
  anchor = attn.reshape(b, t, *attn.shape[1:])[:, 0]  # (B, h, N+1, N+1)
  queries = q.reshape(b, t, *q.shape[1:])[:, 0, :, 1:]  # (B, h, N, d)
  keys = k.reshape(b, t, *k.shape[1:])[:, :, :, 1:]  # (B, T, h, N, d)
  queries = queries.permute(0, 2, 1, 3).flatten(2)  # (B, N, h d)
  keys = keys.permute(0, 1, 3, 2, 4).flatten(3)  # (B, T, N, h d)
  weights = anchor[:, heads, 0, 1:].softmax(dim=-1)  # (B, k, N)
  prototypes = weights @ queries  # (B, k, h d)
  refined = []
  for i in range(b):
    scores = F.normalize(prototypes[i], dim=-1) @ F.normalize(queries[i], dim=-1).T
    refined.append(_sinkhorn(scores / 0.05, 3) @ queries[i])
  refined = torch.stack(refined)  # (B, k, h d)
  logits = torch.einsum("bkd,btnd->btkn", refined, keys) / math.sqrt(keys.shape[-1])
  masks = logits.softmax(dim=2)  # (B, T, k, N)
  masks = (masks > masks.mean()).float()
  grid = frames.shape[-1] // patch
  masks = masks.reshape(b, t, num_objects, 1, grid, grid)
  masks = masks.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)
  return (frames[:, :, None] * masks).flatten(0, 2)


class TorchStep:
  """The PyTorch step on fixed inputs; `step()` runs one and records its seconds."""

  name = "pytorch eager (twin)"

  def __init__(self, size, frames: np.ndarray, crops: np.ndarray, out_dim: int, *,
               hidden_dim: int = 2048, bottleneck_dim: int = 256, num_objects: int = 3,
               threads: int | None = None):
    """frames uint8 (B, T, H, W, 3), crops uint8 (B, T, M, h, w, 3), as our benchmark's batch."""
    torch.manual_seed(0)
    torch.set_num_threads(threads or os.cpu_count())
    self.size, self.num_objects = size, num_objects
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 1, 3, 1, 1)
    frames = torch.from_numpy(np.array(frames)).permute(0, 1, 4, 2, 3).float() / 255
    self.frames = (frames - mean) / std
    crops = torch.from_numpy(np.array(crops)).permute(0, 1, 2, 5, 3, 4).float() / 255
    self.crops = (crops - mean[:, None]) / std[:, None]
    image = self.frames.shape[-1]
    self.student = _Model(size, image, out_dim, hidden_dim, bottleneck_dim, drop_path=0.1)
    self.teacher = _Model(size, image, out_dim, hidden_dim, bottleneck_dim, drop_path=0.0)
    self.teacher.load_state_dict(self.student.state_dict())
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.teacher.eval()
    self.center = torch.zeros(1, out_dim)
    params = [p for p in self.student.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)
    self.times = []
    self.compile_seconds = 0.0
    self.flops = None
    self.memory = None
    self.step(timed=False)

  def step(self, timed: bool = True) -> None:
    start = time.perf_counter()
    self._step()
    if timed:
      self.times.append(time.perf_counter() - start)

  def _step(self) -> None:
    b, t = self.frames.shape[:2]
    with torch.no_grad():
      cls, attn, q, k = self.teacher.backbone(self.frames.flatten(0, 1), keep_qk=True)
      teacher_out = self.teacher.head(cls)  # (BT, K)
      views = _object_views(self.frames, attn, q, k, self.num_objects, self.size.patch_size)
    targets = F.softmax((teacher_out - self.center) / 0.04, dim=-1).reshape(b, t, 1, -1)
    crops = self.crops.flatten(0, 2)
    features = torch.cat([self.student.backbone(views), self.student.backbone(crops)])
    logits = self.student.head(features) / 0.1
    num_views, num_crops = views.shape[0] // (b * t), crops.shape[0] // (b * t)
    view_logits = logits[:views.shape[0]].reshape(b, t, num_views, -1)
    crop_logits = logits[views.shape[0]:].reshape(b, t, num_crops, -1)
    student = torch.cat([view_logits, crop_logits], dim=2).log_softmax(dim=-1)
    loss = -(targets * student).sum(dim=-1).mean()
    self.optimizer.zero_grad()
    loss.backward()
    for p in self.student.parameters():  # DINO's clip_gradients: each tensor's norm <= 3.
      if p.grad is not None:
        norm = p.grad.norm()
        p.grad.mul_(torch.clamp(3.0 / (norm + 1e-6), max=1.0))
    self.student.head.last_v.grad = None  # cancel_gradients_last_layer in the first epoch.
    self.optimizer.step()
    with torch.no_grad():
      for p_s, p_t in zip(self.student.parameters(), self.teacher.parameters()):
        p_t.mul_(0.996).add_((1 - 0.996) * p_s.detach())
      self.center.mul_(0.9).add_(0.1 * teacher_out.mean(dim=0, keepdim=True))
