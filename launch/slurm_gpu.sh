#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node, all local GPUs each.
# jax.distributed.initialize() reads the coordinator, the process count and
# this process's id from SLURM's environment.
#
#   NODES=4 GPUS_PER_NODE=8 CONFIG=configs/default.py WORKDIR=/shared/runs/exp1 \
#   launch/slurm_gpu.sh [--config.seed=1 ...]
#
# WORKDIR must be visible to every node: a shared file system or gs://...
#
# Installs JAX's CUDA build first if .venv lacks it (./setup.sh
# --accelerator=gpu, on this node, once). Each run prints its backend and
# devices, and warns if a GPU is visible but JAX runs on the CPU.
# DRY_RUN=1 prints the setup command and the sbatch script instead.
set -euo pipefail
: "${WORKDIR:?set WORKDIR}"
NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
CONFIG="${CONFIG:-configs/default.py}"
TIME="${TIME:-24:00:00}"
# SLURM's own log must be a local/shared path, not gs://.
if [[ "$WORKDIR" == *://* ]]; then LOGDIR="${LOGDIR:-logs}"; else LOGDIR="${LOGDIR:-$WORKDIR}"; fi
cd "$(dirname "$0")/.."

script="#!/usr/bin/env bash
#SBATCH --job-name=vmoe_jsd
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${GPUS_PER_NODE}
#SBATCH --time=${TIME}
#SBATCH --output=${LOGDIR}/slurm-%j.out
#SBATCH --requeue
#SBATCH --signal=TERM@120
# --requeue: a preempted job restarts and resumes from its last checkpoint.
# On SIGTERM (preemption, scancel; --signal also sends it 120 s before the
# time limit) training finishes its step, saves it and exits 0.
# Pass --config.nan_policy=skip for requeued jobs: under 'stop' a NaN would
# recur at the same step after every requeue.
cd $(pwd)
srun .venv/bin/python -m vmoe_jsd.main --distributed --config=${CONFIG} --workdir=${WORKDIR} $*"

has_cuda() {
  .venv/bin/python -c 'import jax_plugins.xla_cuda12' >/dev/null 2>&1
}
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  has_cuda || echo "./setup.sh --accelerator=gpu"
  echo "$script"
else
  has_cuda || ./setup.sh --accelerator=gpu
  mkdir -p "$LOGDIR"
  echo "$script" | sbatch
fi
