#!/usr/bin/env bash
# Runs mixer_jax on every host of a Cloud TPU VM pod slice (e.g. a v3-32: 4 hosts x 8 cores).
#
#   scripts/tpu_pod.sh setup TPU_NAME ZONE            copy this checkout to ~/mixer_jax on every worker and build
#                                                     its .venv (pinned requirements + jax[tpu] 0.10.2)
#   scripts/tpu_pod.sh train TPU_NAME ZONE ARGS...    python train.py ARGS... on every worker at once
#   scripts/tpu_pod.sh eval  TPU_NAME ZONE ARGS...    python eval.py ARGS... on every worker at once
#
# Example:
#   scripts/tpu_pod.sh train my-v3-32 europe-west4-a --config=configs/mixer_i1k.py \
#       --workdir=gs://BUCKET/mixer_b16_i1k --config.input.data_dir=gs://BUCKET/tensorflow_datasets
#
# Expects: gcloud authenticated for the project; the dataset prepared with tfds in a GCS bucket every worker
# reads (--config.input.data_dir), and the workdir on GCS too (orbax writes one checkpoint from all hosts).
# Every worker runs the same command; jax.distributed.initialize() finds the pod by itself, each host reads its
# own slice of the data, and process 0 writes logs and metrics.
set -euo pipefail
action=${1:?setup, train or eval}; tpu=${2:?TPU name}; zone=${3:?zone}; shift 3
on_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command="$1"; }
case "$action" in
  setup)
    gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all --recurse "$(dirname "$0")/.." "$tpu":~/mixer_jax
    on_all 'cd ~/mixer_jax && make venv && .venv/bin/pip install "jax[tpu]==0.10.2"' ;;
  train|eval)
    on_all "cd ~/mixer_jax && .venv/bin/python $action.py $(printf '%q ' "$@")" ;;
  *) echo "unknown action $action: setup, train or eval" >&2; exit 2 ;;
esac
