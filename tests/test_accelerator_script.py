"""benchmarks/accelerator.sh: its dry run prints the install and benchmark commands and runs the
same benchmark with tiny sizes on the CPU, ending in the table (test_launch.py shellchecks it)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.sh")


def test_dry_run_prints_the_commands_and_a_table():
  # One CPU device: the benchmark's steps run on one device, with the host's whole peak.
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=xla_flags,
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  commands = [line for line in out.splitlines() if line.startswith("+ ")]
  assert any("-m venv" in line for line in commands)
  assert any(re.search(r"pip install .*jax\[cuda1[23]\] -e \.", line) for line in commands)
  for setting in ("dora", "dino"):
    assert any(f"--preset=paper-device --steps=5 --settings={setting}" in line
               for line in commands)
  assert not os.path.exists(os.path.join(ROOT, ".venv-accelerator"))  # Printed, not run.
  rows = {}
  for line in out.splitlines():
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    if line.startswith("| ") and cells[0] in ("dora", "dino"):
      rows[cells[0]] = cells
  assert set(rows) == {"dora", "dino"}, out[-2000:]
  for name, (_, seconds, frames, tflops, mfu, _, xla_gib) in rows.items():
    assert float(seconds) > 0 and float(frames) > 0 and float(tflops) > 0, name
    assert 0 < float(mfu) < 1 and float(xla_gib) > 0, name  # The CPU's peak is measured.
  # 2 clips x 2 frames per step in the tiny run.
  assert float(rows["dino"][2]) == pytest.approx(4 / float(rows["dino"][1]), rel=0.01)
