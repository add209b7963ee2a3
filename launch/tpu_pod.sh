#!/usr/bin/env bash
# Train on a multi-host Cloud TPU pod slice (e.g. v4-32, v5p-64): one dora-train process per host.
#
#   launch/tpu_pod.sh setup  TPU_NAME ZONE BUCKET
#   launch/tpu_pod.sh train  TPU_NAME ZONE BUCKET CONFIG[:ARG] RUN_NAME [--config.key=value ...]
#   launch/tpu_pod.sh log    TPU_NAME ZONE             # follow host 0's log
#   launch/tpu_pod.sh stop   TPU_NAME ZONE             # SIGTERM everywhere: save, then exit
#
# `setup` copies this checkout to every host, installs it with jax[tpu], and mounts the GCS bucket
# at /mnt/BUCKET (gcsfuse) on every host, so that all hosts see the same shards and work folder.
# Put the shards there first, e.g.
#   dora-convert Venice.mp4 --out wt_venice && gcloud storage cp -r wt_venice gs://BUCKET/data/
# `train` then runs, on all hosts at once,
#   dora-train --distributed --config CONFIG --workdir /mnt/BUCKET/runs/RUN_NAME
#     --config.data.dir=/mnt/BUCKET/data/...   (pass it, or put data=... in the config argument)
# jax.distributed.initialize() finds the other hosts from the TPU metadata. The batch is global:
# batch_size clips per step over all chips. Running `train` again with the same RUN_NAME resumes
# from the latest checkpoint, e.g. after the slice was preempted.
set -euo pipefail

usage() { sed -n '2,20p' "$0"; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }

case "$action" in
  setup)
    [[ $# -ge 1 ]] || usage
    bucket=$1
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude=workdirs -czf /tmp/dora-jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/dora-jax.tgz "$tpu":/tmp/dora-jax.tgz --zone "$zone" --worker=all
    ssh_all "set -e; mkdir -p ~/dora-jax && tar -xzf /tmp/dora-jax.tgz -C ~/dora-jax
      python3 -m venv ~/dora-venv && ~/dora-venv/bin/pip install -q -U pip
      ~/dora-venv/bin/pip install -q -e ~/dora-jax 'jax[tpu]'
      if ! command -v gcsfuse >/dev/null; then
        export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
        echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
        curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
        sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
      fi
      sudo mkdir -p /mnt/$bucket && sudo chown \$USER /mnt/$bucket
      mountpoint -q /mnt/$bucket || gcsfuse --implicit-dirs $bucket /mnt/$bucket"
    ;;
  train)
    [[ $# -ge 3 ]] || usage
    bucket=$1 config=$2 run=$3
    shift 3
    extra=$(printf ' %q' "$@")
    ssh_all "cd ~/dora-jax && nohup ~/dora-venv/bin/dora-train --distributed \
      --config $config --workdir /mnt/$bucket/runs/$run $extra > ~/dora-train.log 2>&1 &"
    echo "Started on every host of $tpu; logs: $0 log $tpu $zone"
    ;;
  log)
    gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=0 --command "tail -f ~/dora-train.log"
    ;;
  stop)
    ssh_all "pkill -TERM -f 'bin/dora-train' || true"
    ;;
  *) usage ;;
esac
