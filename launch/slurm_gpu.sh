#!/usr/bin/env bash
# Train on a GPU cluster with SLURM: one dora-train process per node, each driving its node's GPUs.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh configs/dora_vits16_wtours.py:data=/shared/wt_venice \
#       /shared/runs/dora_vits16_venice [--config.key=value ...]
#
# The work folder and the shards must be on a file system every node sees. jax.distributed
# finds the other nodes from SLURM's environment (under srun). The batch is global (batch_size
# clips per step over all GPUs; the paper's 128 = 16 per GPU x 8). SLURM sends SIGTERM 5 minutes
# before the time limit (--signal): the run saves and exits, and --requeue starts the same command
# again, which resumes from the latest checkpoint.
#
#SBATCH --job-name=dora-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=dora-train-%j.log
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,14p' "$0"; exit 2; }
config=$1 workdir=$2
shift 2
# Activate the environment that has `pip install -e .` of this repository and jax[cuda12].
if [[ -n "${DORA_VENV:-}" ]]; then source "$DORA_VENV/bin/activate"; fi
# Leave XLA its usual share of GPU memory but let several runs share a node if asked.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 dora-train --distributed --config "$config" --workdir "$workdir" "$@"
