#!/usr/bin/env bash
# Multi-host TPU VM pods with gcloud: create, set up, run on every worker, collect logs, delete.
#
#   launch/tpu_vm_pod.sh create
#   launch/tpu_vm_pod.sh setup                  # copies this repo to every worker, installs it
#   launch/tpu_vm_pod.sh run --config=configs/cifar_resnet.py:resnet1001 --workdir=gs://BUCKET/r1001
#   launch/tpu_vm_pod.sh mount BUCKET           # optional: gcsfuse, gs://BUCKET at /mnt/BUCKET
#   launch/tpu_vm_pod.sh logs                   # copies each worker's log to runs/tpu_logs/
#   launch/tpu_vm_pod.sh delete
#
# Edit (or export) these: the Google Cloud project, the zone that has the accelerator, the
# accelerator type (v4-32 = 4 hosts, v5litepod-16 = 4 hosts, ...) and the TPU software version.
# On TPU VMs jax.distributed finds the coordinator and process ids by itself
# (resnorm-train --distributed=auto detects the pod), so every worker runs the same command.
# The workdir must be one every worker reaches under the same name (orbax writes
# checkpoints from every host, metrics come from host 0): a gs:// URL, written directly by
# every worker (the TPU VMs' service account needs read/write access to the bucket; the
# bucket is checked before anything is compiled), or a shared disk (Filestore/NFS), or a
# bucket mounted with `mount` at the same path everywhere (for tools that need files).
set -euo pipefail
PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
NAME="${NAME:-resnorm-${USER:-user}}"
REMOTE_DIR="${REMOTE_DIR:-resnorm_jax}"
LOG="${LOG:-/tmp/resnorm_train.log}"

g() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }
on_all() { g ssh "$NAME" --worker=all --command="$1"; }

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    g create "$NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  setup)
    root="$(cd "$(dirname "$0")/.." && pwd)"
    tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/resnorm_src.tgz .
    g scp /tmp/resnorm_src.tgz "$NAME":/tmp/ --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/resnorm_src.tgz && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e . 'jax[tpu]'" ;;
  mount)   # gs://BUCKET at /mnt/BUCKET on every worker (installs gcsfuse if missing)
    bucket="${1:?usage: launch/tpu_vm_pod.sh mount BUCKET}"
    on_all "command -v gcsfuse >/dev/null || { \
        echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' | \
          sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | \
          sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null && \
        sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && \
      sudo mkdir -p /mnt/$bucket && sudo chown \$USER /mnt/$bucket && \
      { mountpoint -q /mnt/$bucket || gcsfuse --implicit-dirs $bucket /mnt/$bucket; }" ;;
  run)
    args="$(printf '%q ' "$@")"
    on_all "cd $REMOTE_DIR && nohup .venv/bin/resnorm-train --distributed=on $args \
      > $LOG 2>&1 & echo started on \$(hostname)" ;;
  logs)
    mkdir -p runs/tpu_logs
    hosts=$(g describe "$NAME" --format='value(networkEndpoints.len())')
    for ((w = 0; w < hosts; w++)); do
      g scp "$NAME":"$LOG" "runs/tpu_logs/worker_$w.log" --worker="$w" || true
    done
    echo "logs in runs/tpu_logs/" ;;
  stop)   # SIGTERM: every process saves the same step, then exits (exit code 143)
    on_all "pkill -TERM -f resnorm-train || true" ;;
  delete)
    g delete "$NAME" --quiet ;;
  *)
    echo "usage: launch/tpu_vm_pod.sh create|setup|mount BUCKET|run [flags]|logs|stop|delete" >&2; exit 2 ;;
esac
