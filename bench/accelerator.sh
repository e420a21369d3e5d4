#!/usr/bin/env bash
# The accelerator benchmark in one command (under 8 minutes on one H200):
#
#   bash bench/accelerator.sh          # GPU: MLM train step per attention implementation + transformers
#   bash bench/accelerator.sh tpu      # TPU: the JAX implementations
#
# Installs only what is missing, with the Python it finds (PYTHON=..., default python3): a JAX for the
# accelerator (jax[cuda12] / jax[tpu]), flax and optax, and on a GPU PyTorch (the PyPI Linux wheel is a
# CUDA build) and transformers. A machine without a package index can bring wheels in ./.whl
# (installed with --no-index). Writes bench/results_accelerator.md (the table) and .json (every number).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-gpu}"
PY="${PYTHON:-python3}"
shift || true

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
install() {
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl "$@"
  else
    "$PY" -m pip install -q "$@"
  fi
}

case "$DEVICE" in
  gpu)
    "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" >/dev/null 2>&1 || install "jax[cuda12]"
    have torch || install torch
    have transformers || install transformers
    ;;
  tpu)
    "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'tpu')" >/dev/null 2>&1 || install "jax[tpu]"
    ;;
  *)
    echo "error: device must be gpu or tpu, got '$DEVICE'" >&2
    exit 2
    ;;
esac
have flax || install flax
have optax || install optax

"$PY" -c "import jax; print('JAX', jax.__version__, jax.devices())"
if [ "$DEVICE" = gpu ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi
# The whole command stays under 8 minutes: what the installation left of 465 s goes to the measurements
# (each row's report is written as soon as it is measured).
LEFT=$((465 - SECONDS))
if [ "$LEFT" -lt 120 ]; then echo "error: the installation took $SECONDS s; run this command again" >&2; exit 1; fi
exec timeout "$LEFT" "$PY" -m bench.accelerator --device "$DEVICE" --budget $((LEFT - 15)) "$@"
