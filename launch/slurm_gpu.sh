#!/usr/bin/env bash
# Train on a GPU cluster with SLURM: one dora-train process per node, each driving its node's GPUs.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh configs/dora_vits16_wtours.py:data=/shared/wt_venice \
#       /shared/runs/dora_vits16_venice [--config.key=value ...]
#   launch/slurm_gpu.sh --dry-run CONFIG WORKDIR [...]   # print what would run (needs no SLURM)
#
# The work folder and the shards must be on a file system every node sees (or gs:// URLs). The
# SLURM topology goes to jax.distributed: the first node of the allocation is the coordinator
# (JAX_COORDINATOR_ADDRESS, port DORA_COORDINATOR_PORT or 12345), JAX_NUM_PROCESSES is the number
# of tasks and JAX_PROCESS_ID each task's SLURM_PROCID. The batch is global (batch_size clips per
# step over all GPUs; the paper's 128 = 16 per GPU x 8). SLURM sends SIGTERM 5 minutes before the
# time limit (--signal): the run saves and exits, and --requeue starts the same command again,
# which resumes from the latest checkpoint.
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
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
[[ $# -ge 2 ]] || { sed -n '2,15p' "$0"; exit 2; }
config=$1 workdir=$2
shift 2

if (( dry_run )); then
  # A stand-in allocation of two nodes, so that the printed commands show the topology.
  SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-node[01-02]}
  SLURM_NTASKS=${SLURM_NTASKS:-2}
  first_node=${SLURM_JOB_NODELIST%%[*}$(sed -E 's/.*\[([0-9]+).*/\1/' <<< "$SLURM_JOB_NODELIST")
else
  # All of scontrol's output read, then the first line: `| head -n 1` can end scontrol with
  # SIGPIPE, which pipefail turns into a failed script (exit 141).
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [[ ${#nodes[@]} -gt 0 ]] || {
    echo "slurm_gpu.sh: scontrol show hostnames gave no node for $SLURM_JOB_NODELIST" >&2; exit 1; }
  first_node=${nodes[0]}
  # Activate the environment that has `pip install -e .` of this repository and jax[cuda12].
  if [[ -n "${DORA_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$DORA_VENV/bin/activate"
  fi
fi
export JAX_COORDINATOR_ADDRESS="$first_node:${DORA_COORDINATOR_PORT:-12345}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
# Leave XLA its usual share of GPU memory but let several runs share a node if asked.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

# Each task reads its own SLURM_PROCID, hence the single quotes.
# shellcheck disable=SC2016
task='JAX_PROCESS_ID=$SLURM_PROCID exec dora-train --distributed "$@"'
command=(srun --kill-on-bad-exit=1 bash -c "$task" dora-train --config "$config"
         --workdir "$workdir" "$@")
if (( dry_run )); then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES"
  printf '%q ' "${command[@]}"
  printf '\n'
else
  "${command[@]}"
fi
