"""benchmarks/train_step.py beyond the accelerator script's rows: --breakdown (the step cut into
parts) and the PyTorch twin (--torch), at tiny sizes on one CPU device."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_with_breakdown_and_the_torch_twin():
  pytest.importorskip("torch")
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=xla_flags,
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "benchmarks/train_step.py", "--model_sizes=32,3,4,8", "--clips=1",
       "--frames=2", "--local_crops=2", "--global_size=32", "--local_size=16", "--out_dim=64",
       "--settings=dora_keep", "--torch", "--breakdown", "--steps=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  rows = {row["name"]: row for row in (json.loads(line[len("row: "):]) for line in lines
                                       if line.startswith("row: "))}
  assert set(rows) == {"dora_keep", "pytorch eager (twin)"}, result.stdout
  assert rows["dora_keep"]["gflop"] > 0  # XLA's count, the scanned blocks' trips included.
  assert all(row["s_per_step"] > 0 and row["frames_per_s"] > 0 for row in rows.values())
  parts = [line for line in lines
           if re.match(r"\s+(teacher|student|objects|DINO|optimiser)", line)]
  # 6 masked views (2 frames x k=3) and 4 crops through one head call.
  assert len(parts) == 9 and any("student head fwd+bwd, 10 rows" in p for p in parts), parts
  assert any("sum of the parts" in line for line in lines)
  assert lines[-1].startswith("frames/s: ") and float(lines[-1].split()[1]) > 0
