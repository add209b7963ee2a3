#!/usr/bin/env bash
# Train on a multi-host Cloud TPU pod slice (e.g. v4-32, v5p-64): one dora-train process per host.
#
#   launch/tpu_pod.sh [--dry-run] setup  TPU_NAME ZONE
#   launch/tpu_pod.sh [--dry-run] train  TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh [--dry-run] log    TPU_NAME ZONE             # follow host 0's log
#   launch/tpu_pod.sh [--dry-run] stop   TPU_NAME ZONE             # SIGTERM everywhere: save, exit
#
# `setup` copies this checkout to every host and installs it with jax[tpu]. WORKDIR and the data
# folder are gs:// URLs (e.g. WORKDIR=gs://BUCKET/runs/venice, --config.data.dir=gs://BUCKET/data/
# wt_venice): checkpoints (orbax), metrics.jsonl, TensorBoard events and pictures are written
# straight to Cloud Storage and the shards are read from it; no bucket is mounted. Put the shards
# there first, e.g.
#   dora-convert Venice.mp4 --out wt_venice && gcloud storage cp -r wt_venice gs://BUCKET/data/
# `train` then runs, on all hosts at once,
#   dora-train --distributed --config CONFIG --workdir WORKDIR [--config.key=value ...]
# jax.distributed.initialize() finds the other hosts from the TPU metadata. The batch is global:
# batch_size clips per step over all chips. Running `train` again with the same WORKDIR resumes
# from the latest checkpoint, e.g. after the slice was preempted.
#
# --dry-run prints the commands (one per line, shell-quoted) instead of running them.
set -euo pipefail

usage() { sed -n '2,22p' "$0"; exit 2; }
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3

run() {  # Runs a command, or prints it under --dry-run.
  if (( dry_run )); then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}
ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }

case "$action" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    run tar -C "$repo" --exclude=.venv --exclude=.git --exclude=workdirs -czf /tmp/dora-jax.tgz .
    run gcloud compute tpus tpu-vm scp /tmp/dora-jax.tgz "$tpu":/tmp/dora-jax.tgz --zone "$zone" \
      --worker=all
    ssh_all "set -e; mkdir -p ~/dora-jax && tar -xzf /tmp/dora-jax.tgz -C ~/dora-jax
      python3 -m venv ~/dora-venv && ~/dora-venv/bin/pip install -q -U pip
      ~/dora-venv/bin/pip install -q -e ~/dora-jax 'jax[tpu]' gcsfs"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config=$1 workdir=$2
    shift 2
    extra=""
    if [[ $# -gt 0 ]]; then extra=$(printf ' %q' "$@"); fi
    ssh_all "cd ~/dora-jax && nohup ~/dora-venv/bin/dora-train --distributed \
--config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir")$extra > ~/dora-train.log 2>&1 &"
    (( dry_run )) || echo "Started on every host of $tpu; logs: $0 log $tpu $zone"
    ;;
  log)
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=0 \
      --command "tail -f ~/dora-train.log"
    ;;
  stop)
    ssh_all "pkill -TERM -f 'bin/dora-train' || true"
    ;;
  *) usage ;;
esac
