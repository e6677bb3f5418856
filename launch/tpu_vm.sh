#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or pod slice): every worker runs the
# same command; jax.distributed.initialize() finds the others by itself.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/default.py \
#   WORKDIR=gs://my-bucket/runs/exp1 launch/tpu_vm.sh [--config.seed=1 ...]
#
# WORKDIR must be shared by all workers: use gs://bucket/path (a local path
# would give each worker its own disk). Maintenance events send SIGTERM:
# training saves the step all workers agree on and exits; run the same
# command again to resume.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/default.py}"
REPO="${REPO:-https://github.com/OWNER/vmoe_jsd.git}"
BRANCH="${BRANCH:-main}"
EXTRA_ARGS=("$@")

remote="set -e
if [ ! -d vmoe_jsd ]; then git clone -b ${BRANCH} ${REPO} vmoe_jsd; fi
cd vmoe_jsd && git pull -q
./setup.sh --accelerator=tpu
.venv/bin/python -m vmoe_jsd.main --distributed --config=${CONFIG} --workdir=${WORKDIR} ${EXTRA_ARGS[*]:-}"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all
     --command "$remote")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
