#!/usr/bin/env bash
# Cloud TPU pods: create a slice (optionally as a queued resource), install
# metis_jax on every worker, run the trainer on all workers at once, delete.
#
#   TPU_NAME=metis ZONE=us-east5-a ACCELERATOR=v5p-256 launch/tpu_pod.sh create
#   TPU_NAME=metis ZONE=us-east5-a launch/tpu_pod.sh setup
#   TPU_NAME=metis ZONE=us-east5-a CONFIG=configs/metis_base_v5p256.py \
#       WORKDIR=gs://BUCKET/metis_base launch/tpu_pod.sh train [--config.train.steps=1000 ...]
#   TPU_NAME=metis ZONE=us-east5-a launch/tpu_pod.sh ssh 'ls ~/metis_jax'   # any command, all workers
#   TPU_NAME=metis ZONE=us-east5-a launch/tpu_pod.sh delete
#
# DRY_RUN=1 prints the gcloud commands instead of running them.
# jax.distributed finds the other workers by itself on TPU VMs
# (metis_jax/distributed.py), so every worker runs the same command.
#
# Environment: TPU_NAME, ZONE (required); PROJECT (default: gcloud's);
# ACCELERATOR (v5p-256); RUNTIME_VERSION (v2-alpha-tpuv5); QUEUED=1 to use
# queued resources (waits for capacity instead of failing), SPOT=1 for spot
# capacity; REPO (git URL to clone) and BRANCH (main); CONFIG, WORKDIR.
set -euo pipefail

ACTION="${1:-}"
shift || true
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5p-256}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
REPO="${REPO:-https://github.com/YOUR_ORG/metis_jax.git}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/metis_base_v5p256.py}"
WORKDIR="${WORKDIR:-}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

case "$ACTION" in
  create)
    if [[ "${QUEUED:-0}" == "1" ]]; then
      extra=()
      if [[ "${SPOT:-0}" == "1" ]]; then extra=(--spot); fi
      run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" \
        --zone "$ZONE" "${PROJECT_FLAG[@]}" --accelerator-type "$ACCELERATOR" \
        --runtime-version "$RUNTIME_VERSION" "${extra[@]}"
      echo "queued; watch with: gcloud compute tpus queued-resources describe $TPU_NAME --zone $ZONE"
    else
      extra=()
      if [[ "${SPOT:-0}" == "1" ]]; then extra=(--spot); fi
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
        --accelerator-type "$ACCELERATOR" --version "$RUNTIME_VERSION" "${extra[@]}"
    fi
    ;;
  setup)
    on_all_workers "set -e; (test -d ~/metis_jax || git clone -b $BRANCH $REPO ~/metis_jax); \
cd ~/metis_jax && git fetch -q && git checkout -q $BRANCH && git pull -q && pip install -q -e '.[tpu]'"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR (a gs:// path all workers can write)}"
    args=""
    for a in "$@"; do args+=" $(printf '%q' "$a")"; done
    on_all_workers "cd ~/metis_jax && python -m metis_jax.train --config $CONFIG --workdir $WORKDIR$args \
2>&1 | tee -a ~/metis_train.log"
    ;;
  ssh)
    on_all_workers "${1:?give the command to run on all workers}"
    ;;
  delete)
    if [[ "${QUEUED:-0}" == "1" ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
    fi
    ;;
  *)
    echo "usage: $0 create|setup|train|ssh|delete  (see the header of this file)" >&2
    exit 2
    ;;
esac
