#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node, all local GPUs each.
# jax.distributed.initialize() reads the coordinator, the process count and
# this process's id from SLURM's environment.
#
#   NODES=4 GPUS_PER_NODE=8 CONFIG=configs/default.py WORKDIR=/shared/runs/exp1 \
#   launch/slurm_gpu.sh [--config.seed=1 ...]
#
# Run ./setup.sh once first and `.venv/bin/pip install 'jax[cuda12]'`
# (same version as requirements.txt). DRY_RUN=1 prints the sbatch script.
set -euo pipefail
: "${WORKDIR:?set WORKDIR}"
NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
CONFIG="${CONFIG:-configs/default.py}"
TIME="${TIME:-24:00:00}"
cd "$(dirname "$0")/.."

script="#!/usr/bin/env bash
#SBATCH --job-name=vmoe_jsd
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${GPUS_PER_NODE}
#SBATCH --time=${TIME}
#SBATCH --output=${WORKDIR}/slurm-%j.out
#SBATCH --requeue
# --requeue: a preempted job restarts and resumes from its last checkpoint.
cd $(pwd)
srun .venv/bin/python -m vmoe_jsd.main --distributed --config=${CONFIG} --workdir=${WORKDIR} $*"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "$script"
else
  mkdir -p "$WORKDIR"
  echo "$script" | sbatch
fi
