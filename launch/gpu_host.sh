#!/usr/bin/env bash
# Runs medjax on one host with one or more GPUs: one process drives all the GPUs it sees
# (CUDA_VISIBLE_DEVICES picks them), so no --distributed.
#
#   launch/gpu_host.sh setup                                   venv + editable install with CUDA jaxlib
#   launch/gpu_host.sh train CONFIG WORKDIR [--config.x=y ...]
#   launch/gpu_host.sh eval  WORKDIR [--split=test ...]
#
# Run from anywhere; commands run in this checkout. PYTHON overrides the interpreter (default
# .venv/bin/python); JAX_CUDA sets the jax extra for setup (default cuda12; cuda13 for a CUDA 13 driver).
# On SIGTERM or Ctrl-C training saves a checkpoint and exits with status 75; rerun `train` to resume.
# Set DRY_RUN=1 to print the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
action=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-.venv/bin/python}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

cd "$repo"
case "$action" in
  setup)
    [ $# -eq 0 ] || usage
    run python3 -m venv .venv
    run .venv/bin/pip install -q -e . "jax[${JAX_CUDA:-cuda12}]==0.10.2"
    ;;
  train)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2
    shift 2
    run "$python" -m medjax.main --config="$config" --workdir="$workdir" "$@"
    ;;
  eval)
    [ $# -ge 1 ] || usage
    workdir=$1
    shift
    run "$python" -m medjax.evaluate --workdir="$workdir" "$@"
    ;;
  *) usage ;;
esac
