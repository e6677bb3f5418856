#!/usr/bin/env bash
# Sets up the project in ./.venv (Python >= 3.10; tested on 3.11).
#   ./setup.sh                      virtual environment + pinned packages + this
#                                   package (JAX for the CPU)
#   ./setup.sh --accelerator=gpu    also JAX's CUDA 12 build (jax[cuda12]) at the
#                                   pinned JAX version (NVIDIA driver >= 525)
#   ./setup.sh --accelerator=tpu    also JAX's TPU build (jax[tpu], libtpu) at the
#                                   pinned JAX version (Cloud TPU VMs)
#   ./setup.sh --accelerator=cpu    the default
#   ./setup.sh --data               also Debian's dataset-fashion-mnist (the
#                                   default data; needs root or sudo, and apt)
# Options combine: ./setup.sh --data --accelerator=gpu
set -euo pipefail
cd "$(dirname "$0")"

DATA=0
ACCELERATOR=cpu
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA=1 ;;
    --accelerator=*) ACCELERATOR="${1#--accelerator=}" ;;
    --accelerator) shift; ACCELERATOR="${1:-}" ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (use --data, --accelerator=cpu|gpu|tpu)" >&2; exit 2 ;;
  esac
  shift
done
case "$ACCELERATOR" in
  cpu) JAX_EXTRA="" ;;
  gpu|cuda|cuda12) ACCELERATOR=gpu; JAX_EXTRA="cuda12" ;;
  tpu) JAX_EXTRA="tpu" ;;
  *) echo "setup.sh: --accelerator='$ACCELERATOR' is invalid: use cpu, gpu or tpu" >&2; exit 2 ;;
esac

if [[ "$DATA" == 1 ]]; then
  if [[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]]; then
    echo "Fashion-MNIST already in /usr/share/datasets/fashion-mnist."
  else
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  fi
fi

# pip, its output (notices, setuptools' editable-install banner) shown only
# if it fails: setup prints its own lines.
pip_install() {
  local out
  if ! out=$(.venv/bin/python -m pip install -q "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "setup.sh: pip install $* failed (its output above)" >&2
    exit 1
  fi
}

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
echo "Installing the pinned packages (requirements.txt) into .venv..."
pip_install --upgrade pip
pip_install -r requirements.txt
if [[ -n "$JAX_EXTRA" ]]; then
  # The accelerator plugin at exactly the pinned jax/jaxlib version.
  JAX_VERSION=$(sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements.txt)
  pip_install "jax[${JAX_EXTRA}]==${JAX_VERSION}" "jaxlib==${JAX_VERSION}"
fi
pip_install --no-deps -e .
.venv/bin/python -c "import jax; print(f'JAX {jax.__version__}: backend {jax.default_backend()}, devices {jax.devices()}')" 2>/dev/null \
  || echo "JAX is installed; it found no ${ACCELERATOR} device here (fine on a login node)."
echo "Ready: .venv/bin/python -m vmoe_jsd.main --config=configs/default.py --workdir=runs/default"
