#!/usr/bin/env bash
# Runs mixer_jax on every host of a Cloud TPU VM pod slice (e.g. a v3-32: 4 hosts x 8 cores).
#
#   scripts/tpu_pod.sh setup TPU_NAME ZONE            copy this checkout to ~/mixer_jax on every worker and build
#                                                     its .venv (pinned requirements + jax[tpu] 0.10.2)
#   scripts/tpu_pod.sh check TPU_NAME ZONE ARGS...    compile train.py ARGS' config for the slice, here: HBM,
#                                                     FLOPs, collectives, roofline; exit 1 if it does not fit
#   scripts/tpu_pod.sh train TPU_NAME ZONE ARGS...    the check, then python train.py ARGS... on every worker
#   scripts/tpu_pod.sh eval  TPU_NAME ZONE ARGS...    python eval.py ARGS... on every worker at once
#
# Example:
#   scripts/tpu_pod.sh train my-v3-32 europe-west4-a --config=configs/mixer_i1k.py \
#       --workdir=gs://BUCKET/mixer_b16_i1k --config.input.data_dir=gs://BUCKET/tensorflow_datasets
#
# Before `train` starts anything on the pod, this machine compiles the run's train and eval steps for the
# slice's topology with libtpu's compiler (python -m mixer_jax.bench compile, no TPU needed) and refuses to
# launch a config that does not fit in HBM. The topology comes from the slice's accelerator type (gcloud
# describe: v3-32 -> v3:4x4); set TOPOLOGY=v4:2x2x4 for a slice created with another shape.
#
# Expects: gcloud authenticated for the project; the dataset prepared with tfds in a GCS bucket every worker
# reads (--config.input.data_dir), and the workdir where every worker writes: a gs:// URL (orbax writes one
# checkpoint from all hosts, each its own shards; every worker checks the bucket before it starts).
# Every worker runs the same command; jax.distributed.initialize() finds the pod by itself, each host reads its
# own slice of the data, and process 0 writes logs and metrics.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set /{/^#\( \|$\)/s/^# \{0,1\}//p}' "$0"; exit 0; fi
if (( $# < 3 )); then echo "usage: $0 setup|check|train|eval TPU_NAME ZONE [ARGS...] (--help explains)" >&2; exit 2; fi
action=$1; tpu=$2; zone=$3; shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
on_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command="$1"; }

# The pre-launch compile, on this machine: the venv and the TPU compiler (the libtpu pin of requirements-dev.txt,
# the version jax[tpu]==0.10.2 installs on the pod).
check() {
  local topology=${TOPOLOGY:-$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" \
                                 --format='value(acceleratorType)')}
  local config_args=() arg
  for arg in "$@"; do [[ $arg == --config* ]] && config_args+=("$arg"); done
  make -s -C "$repo" venv
  "$repo/.venv/bin/python" -c 'import libtpu' 2>/dev/null \
    || "$repo/.venv/bin/pip" install --quiet "$(grep '^libtpu==' "$repo/requirements-dev.txt")"
  echo "pre-launch check: compiling for $tpu ($topology) on this machine"
  (cd "$repo" && .venv/bin/python -m mixer_jax.bench compile --topology="$topology" "${config_args[@]}") \
    || { echo "not launched on $tpu: see above" >&2; exit 1; }
}

case "$action" in
  setup)
    gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all --recurse "$repo" "$tpu":~/mixer_jax
    on_all 'cd ~/mixer_jax && make venv && .venv/bin/pip install "jax[tpu]==0.10.2"' ;;
  check)
    check "$@" ;;
  train)
    check "$@"
    on_all "cd ~/mixer_jax && .venv/bin/python train.py $(printf '%q ' "$@")" ;;
  eval)
    on_all "cd ~/mixer_jax && .venv/bin/python eval.py $(printf '%q ' "$@")" ;;
  *) echo "unknown action $action: setup, check, train or eval" >&2; exit 2 ;;
esac
