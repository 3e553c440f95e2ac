#!/usr/bin/env bash
# Trains on every GPU of one machine: one process drives all local GPUs (no jax.distributed needed).
#
#   scripts/gpu_host.sh setup                 build .venv with the pinned requirements + jax[cuda12] 0.10.2
#   scripts/gpu_host.sh check ARGS...         compile ARGS' config for this machine's GPUs: memory, FLOPs,
#                                             collectives, roofline; exit 1 if it does not fit
#   scripts/gpu_host.sh ARGS...               the check, then python train.py ARGS... (e.g.
#                                             --config=configs/davit_i1k.py --workdir=...)
#
# Expects: NVIDIA driver and CUDA 12 runtime from the jax[cuda12] wheels; --config.input.data_dir on a local
# disk or GCS. The default mesh (-1, 1, 1) is data parallel over all visible GPUs; restrict them with
# CUDA_VISIBLE_DEVICES.
#
# Before training starts, the config (the --config and --config.* arguments) is compiled for this machine's GPUs
# by XLA:GPU's compiler running on the CPU (python -m mixer_jax.bench compile --topology=<gpu>:1x<n> with
# JAX_PLATFORMS=cpu, so the GPUs stay free), and a config whose train step does not fit in their memory is refused
# with nothing started. <gpu> is nvidia-smi's name of the first GPU, <n> the number of CUDA_VISIBLE_DEVICES (all
# GPUs nvidia-smi lists when it is not set). Override them with GPU=<name> (a100-40gb, a100-80gb, h100, h200, an
# nvidia-smi name or a machine type such as a3-highgpu-8g) and GPUS_PER_HOST=<n>, e.g. to check on a machine
# without GPUs (it needs `make gpu-compiler` there); GPU_HOSTS=<hosts> checks for that many such hosts (the SLURM
# scripts do). PRELAUNCH_CHECK=0 skips the check.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set /{/^#\( \|$\)/s/^# \{0,1\}//p}' "$0"; exit 0; fi
cd "$(dirname "$0")/.."

fail() { echo "$1" >&2; exit 1; }

# Sets `topology` to <gpu>:<hosts>x<gpus per host>. CUDA_VISIBLE_DEVICES counts before nvidia-smi: it is what JAX
# will see (SLURM sets it to the job's GPUs of the node), while nvidia-smi may list GPUs that are not ours.
find_topology() {
  local gpu=${GPU:-} per_host=${GPUS_PER_HOST:-} hosts=${GPU_HOSTS:-1} listing='' ids
  if [[ -z $gpu || ( -z $per_host && -z ${CUDA_VISIBLE_DEVICES+set} ) ]]; then
    if command -v nvidia-smi >/dev/null; then
      listing=$(nvidia-smi --query-gpu=name --format=csv,noheader) \
        || fail "nvidia-smi cannot list the GPUs: set GPU=<name> and GPUS_PER_HOST=<n> (--help lists the names)"
    elif [[ -z $gpu ]]; then
      fail "no nvidia-smi here to name the GPU: set GPU=<name> (a100-40gb, a100-80gb, h100, h200, a3-highgpu-8g, ...)"
    fi
  fi
  gpu=${gpu:-${listing%%$'\n'*}}
  if [[ -z $per_host ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
      IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
      per_host=${#ids[@]}
    elif [[ -n $listing ]]; then
      per_host=$(grep -c . <<< "$listing")
    else
      fail "no nvidia-smi here to count the GPUs: set GPUS_PER_HOST=<n>"
    fi
  fi
  [[ $per_host =~ ^[1-9][0-9]*$ ]] || fail "$per_host GPUs per host: nothing to compile for; set GPUS_PER_HOST=<n>"
  [[ $hosts =~ ^[1-9][0-9]*$ ]] || fail "GPU_HOSTS=$hosts: give the number of hosts"
  topology="$gpu:${hosts}x$per_host"
}

# JAX_PLATFORMS=cpu whatever the environment says: the compile must neither need nor hold the GPUs training is about
# to take, and bench compile refuses to compile for GPUs with CUDA as JAX's platform.
check() {
  local config_args=() arg
  find_topology
  for arg in "$@"; do
    if [[ $arg == --config* ]]; then config_args+=("$arg"); fi
  done
  [[ -x .venv/bin/python ]] || fail "no .venv in $PWD: run scripts/gpu_host.sh setup first"
  echo "pre-launch check: compiling for $topology on this machine's CPU"
  JAX_PLATFORMS=cpu .venv/bin/python -m mixer_jax.bench compile --topology="$topology" "${config_args[@]}" \
    || fail "not started: $topology fails the pre-launch check (the error above; PRELAUNCH_CHECK=0 skips it)"
  echo "pre-launch check: the train step fits on $topology"
}

case "${1:-}" in
  setup)
    make venv && .venv/bin/pip install "jax[cuda12]==0.10.2" ;;
  check)
    shift
    check "$@" ;;
  *)
    if [[ ${PRELAUNCH_CHECK:-1} != 0 ]]; then check "$@"; fi
    exec .venv/bin/python train.py "$@" ;;
esac
