#!/usr/bin/env bash
# Creates, sets up, runs medjax on every worker of, and deletes a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh create TPU_NAME ZONE [ACCELERATOR_TYPE]   default v5litepod-8 (RUNTIME_VERSION: below)
#   launch/tpu_vm.sh setup  TPU_NAME ZONE            copy this checkout to all workers and install it
#   launch/tpu_vm.sh train  TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh eval   TPU_NAME ZONE WORKDIR [--split=test ...]
#   launch/tpu_vm.sh watch  TPU_NAME ZONE WORKDIR [--timeout=3600 ...]   continuous evaluation beside `train`
#   launch/tpu_vm.sh delete TPU_NAME ZONE
#
# WORKDIR and config.data.tfds_dir should be gs:// paths that every worker can read. Process 0 prepares
# the dataset (from config.data.manual_dir, which only it needs to see) before the others read it.
# On preemption (SIGTERM) training saves a checkpoint and exits with status 75; rerun `train` to resume.
# Set DRY_RUN=1 to print the commands instead of running them.
set -euo pipefail

# TPU software version for `create`; unset, the one Cloud TPU's docs give for JAX on the accelerator.
runtime_version() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
action=$1 tpu=$2 zone=$3
shift 3
remote_dir='~/medjax'

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"
}

case "$action" in
  create)
    [ $# -le 1 ] || usage
    type=${1:-v5litepod-8}
    run gcloud compute tpus tpu-vm create "$tpu" --zone="$zone" --accelerator-type="$type" \
      --version="${RUNTIME_VERSION:-$(runtime_version "$type")}"
    ;;
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp -d)/medjax.tar.gz
    run tar -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs -czf "$archive" .
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/medjax.tar.gz" --zone="$zone" --worker=all
    on_all_workers "mkdir -p $remote_dir && tar -xzf /tmp/medjax.tar.gz -C $remote_dir && cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
    ;;
  train)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2
    shift 2
    extra=$(printf ' %q' "$@")
    on_all_workers "cd $remote_dir && .venv/bin/python -m medjax.main --distributed --config=$config --workdir=$workdir$extra"
    ;;
  eval)
    [ $# -ge 1 ] || usage
    workdir=$1
    shift
    extra=$(printf ' %q' "$@")
    # Evaluation restores on one host; the result is exact and includes every example.
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=0 \
      --command="cd $remote_dir && .venv/bin/python -m medjax.evaluate --workdir=$workdir$extra"
    ;;
  watch)
    [ $# -ge 1 ] || usage
    workdir=$1
    shift
    extra=$(printf ' %q' "$@")
    # Scores each new checkpoint once, on worker 0 while the slice trains; exits after the final one.
    run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=0 \
      --command="cd $remote_dir && nohup .venv/bin/python -m medjax.evaluate --workdir=$workdir --watch$extra"
    ;;
  delete)
    [ $# -eq 0 ] || usage
    run gcloud compute tpus tpu-vm delete "$tpu" --zone="$zone" --quiet
    ;;
  *) usage ;;
esac
