#!/usr/bin/env bash
# The paper's per-device batch on one NVIDIA GPU (H100/H200): the DoRA and DINO train steps, 16
# clips of 8 frames at 224 px with 6 local crops of 112 px, ViT-S/16, out_dim 65536, bfloat16;
# one table of s/step, frames/s, TFLOP/s, MFU and memory. Takes a few minutes after the install.
#
#   bash benchmarks/accelerator.sh            # on a GPU machine with python3 and the driver only
#   bash benchmarks/accelerator.sh --dry-run  # prints the commands; runs tiny sizes on the CPU
#
# It makes a virtual environment (VENV, default .venv-accelerator) with jax for CUDA from the
# package index (jax[cuda13] when nvidia-smi reports CUDA 13 or later, else jax[cuda12]; JAX_CUDA
# overrides) and this repository, then runs benchmarks/train_step.py --preset=paper-device once
# per setting, so that each row's peak memory is its own. PYTHON (default python3) makes the
# venv; STEPS (default 5) timed steps per setting. The dry run uses PYTHON, which must import
# this repository's dora_jax already.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
dry_run=false
case "${1:-}" in
  --dry-run) dry_run=true ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
venv=${VENV:-.venv-accelerator}
steps=${STEPS:-5}
settings=(dora dino)

run() {  # Prints a command, and runs it unless this is the dry run.
  printf '+ %s\n' "$*"
  if ! $dry_run; then "$@"; fi
}

cuda_extra() {
  if [[ -n "${JAX_CUDA:-}" ]]; then echo "$JAX_CUDA"; return; fi
  local version
  # sed prints the first match and quits (no `| head`: its SIGPIPE would fail the pipeline).
  version=$(nvidia-smi 2>/dev/null | sed -n '/CUDA Version/{s/.*CUDA Version: *\([0-9]*\).*/\1/p;q;}' || true)
  if [[ "${version:-0}" -ge 13 ]]; then echo cuda13; else echo cuda12; fi
}

if ! $dry_run && ! nvidia-smi -L; then
  echo "accelerator.sh: no NVIDIA GPU found (nvidia-smi -L failed); --dry-run runs on the CPU." >&2
  exit 1
fi

# ---- Install: jax with CUDA and this repository, in a fresh virtual environment. ----
run "$python" -m venv "$venv"
run "$venv/bin/python" -m pip install --quiet -U pip
run "$venv/bin/python" -m pip install --quiet -U "jax[$(cuda_extra)]" -e .

# ---- Benchmark: one process per setting. ----
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
bench=(benchmarks/train_step.py --preset=paper-device --steps="$steps")
for setting in "${settings[@]}"; do
  run "$venv/bin/python" "${bench[@]}" --settings="$setting"
done
if $dry_run; then
  echo "dry run: the same benchmark with tiny sizes on the CPU"
  python_used=$python
  tiny=(--steps=2 --clips=2 --frames=2 --global_size=32 --local_size=16 --local_crops=2
        --out_dim=64 "--model_sizes=32,2,4,8")
  for setting in "${settings[@]}"; do
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0" \
      "$python" "${bench[@]}" --settings="$setting" "${tiny[@]}" | tee -a "$rows"
  done
else
  python_used=$venv/bin/python
  for setting in "${settings[@]}"; do
    "$venv/bin/python" "${bench[@]}" --settings="$setting" | tee -a "$rows"
  done
fi

# ---- The table. ----
echo
"$python_used" - "$rows" <<'EOF'
import json
import sys

rows = [json.loads(line[len("row: "):]) for line in open(sys.argv[1]) if line.startswith("row: ")]
fmt = lambda value, spec: "-" if value is None else format(value, spec)
print(f"device: {rows[0]['device']}")
print(f"| step | s/step | frames/s | TFLOP/s | MFU | peak memory GiB (device) | XLA estimate GiB |")
print("|---|---|---|---|---|---|---|")
for row in rows:
  print(f"| {row['name']} | {row['s_per_step']:.4g} | {row['frames_per_s']:.4g} | "
        f"{fmt(row.get('tflops'), '.3g')} | {fmt(row.get('mfu'), '.3g')} | "
        f"{fmt(row['device_peak_gib'], '.3g')} | {fmt(row['xla_gib'], '.3g')} |")
EOF
echo "accelerator.sh: done in ${SECONDS} s"
