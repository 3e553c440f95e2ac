#!/usr/bin/env bash
# Trains on every GPU of one machine: one process drives all local GPUs (no jax.distributed needed).
#
#   scripts/gpu_host.sh setup                 build .venv with the pinned requirements + jax[cuda12] 0.10.2
#   scripts/gpu_host.sh ARGS...               python train.py ARGS... (e.g. --config=configs/davit_i1k.py ...)
#
# Expects: NVIDIA driver and CUDA 12 runtime from the jax[cuda12] wheels; --config.input.data_dir on a local
# disk or GCS. The default mesh (-1, 1, 1) is data parallel over all visible GPUs; restrict them with
# CUDA_VISIBLE_DEVICES.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set /{/^#\( \|$\)/s/^# \{0,1\}//p}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."
if [ "${1:-}" = setup ]; then
  make venv && .venv/bin/pip install "jax[cuda12]==0.10.2"
  exit
fi
exec .venv/bin/python train.py "$@"
