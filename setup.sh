#!/usr/bin/env bash
# Sets up the project in ./.venv (Python >= 3.10; tested on 3.11).
#   ./setup.sh          virtual environment + pinned packages + this package
#   ./setup.sh --data   also Debian's dataset-fashion-mnist (the default data;
#                       needs root or sudo, and apt)
set -euo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "--data" ]]; then
  if [[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]]; then
    echo "Fashion-MNIST already in /usr/share/datasets/fashion-mnist."
  else
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  fi
fi

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "Ready: .venv/bin/python -m vmoe_jsd.main --config=configs/default.py --workdir=runs/default"
