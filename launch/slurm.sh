#!/usr/bin/env bash
# Runs medjax on GPU nodes through SLURM: one process per GPU, started by `srun`, each calling
# jax.distributed.initialize() (medjax.main --distributed), which reads the coordinator, process count
# and id, and its GPU (SLURM_LOCALID) from SLURM's environment.
#
#   launch/slurm.sh train NODES GPUS_PER_NODE CONFIG WORKDIR [--config.x=y ...]   submits a batch job
#   launch/slurm.sh eval  WORKDIR [--split=test ...]                             one GPU, one task
#
# WORKDIR, config.data.tfds_dir and this checkout (with its .venv) must be on a file system all nodes
# share. The job asks SLURM for SIGTERM 120 s before its time limit (--signal); on SIGTERM (that, or
# preemption) training saves a checkpoint and exits with status 75, the job requeues itself, and the
# requeued job resumes from the checkpoint. SBATCH_ARGS adds sbatch options (e.g. "--partition=gpu --time=04:00:00"); PYTHON
# overrides the interpreter (default .venv/bin/python). Set DRY_RUN=1 to print the commands instead.
set -euo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
action=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-.venv/bin/python}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

case "$action" in
  train)
    [ $# -ge 4 ] || usage
    nodes=$1 gpus=$2 config=$3 workdir=$4
    shift 4
    command=$(printf '%q ' "$python" -m medjax.main --distributed --config="$config" --workdir="$workdir" "$@")
    # Tasks see all GPUs of their node (no per-task binding): JAX picks GPU SLURM_LOCALID.
    script="#!/usr/bin/env bash
srun --kill-on-bad-exit=1 ${command% }
status=\$?
# 75: stopped by SIGTERM after saving a checkpoint; requeue the job to resume from it.
if [ \$status -eq 75 ]; then scontrol requeue \"\$SLURM_JOB_ID\"; fi
exit \$status"
    # shellcheck disable=SC2086
    submit=(sbatch --job-name=medjax --nodes="$nodes" --ntasks-per-node="$gpus" --gpus-per-node="$gpus"
      --signal=TERM@120 --requeue --open-mode=append --chdir="$repo" ${SBATCH_ARGS:-})
    if [ "${DRY_RUN:-0}" = 1 ]; then
      printf '%q ' "${submit[@]}"; echo "<<'EOF'"; echo "$script"; echo EOF
    else
      printf '%s\n' "$script" | "${submit[@]}"
    fi
    ;;
  eval)
    [ $# -ge 1 ] || usage
    workdir=$1
    shift
    # shellcheck disable=SC2086
    run srun --nodes=1 --ntasks=1 --gpus=1 --chdir="$repo" ${SBATCH_ARGS:-} \
      "$python" -m medjax.evaluate --workdir="$workdir" "$@"
    ;;
  *) usage ;;
esac
