#!/usr/bin/env bash
# A job on several GPU nodes through SLURM: one task per GPU, every task running main.py with --distributed,
# which calls jax.distributed.initialize() with no arguments; JAX reads the coordinator, process count and id
# from srun's environment (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID) and gives each task the GPU of its
# SLURM_LOCALID, so every task must see all GPUs of its node (--gpus-per-node, not --gpus-per-task).
#   launch/slurm.sh [--dry_run] [--nodes=2] [--gpus_per_node=8] [--partition=P] [--account=A] [--time=24:00:00]
#                   [--venv=PATH] CONFIG WORKDIR [--config.x=y ...]
# WORKDIR must be on a filesystem every node mounts. Writes WORKDIR/slurm/job.sbatch and submits it;
# --dry_run prints the script and the sbatch command instead. A preempted run (SIGTERM: main.py writes a final
# checkpoint and exits with 143 = 128 + 15) is requeued and resumes from that checkpoint; any other failure is
# not retried.
set -euo pipefail
source "$(dirname "$0")/common.sh"
dry='' nodes=2 gpus=8 partition='' account='' time_limit='24:00:00' venv=''
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry_run) dry=1 ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus_per_node=*) gpus=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --venv=*) venv=${1#*=} ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry_run] [--nodes=N] [--gpus_per_node=G] ... CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2
fi
config=$1 workdir=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n $venv && ! -f $venv/bin/activate ]]; then
  # checked here too, as the nodes mount the same filesystem: a wrong path fails now, not after the queue wait
  msg="--venv=$venv has no bin/activate on this host"
  if [[ -n $dry ]]; then echo "warning: $msg" >&2; else echo "error: $msg" >&2; exit 2; fi
fi
script="$workdir/slurm/job.sbatch"

sbatch_script() {
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=sce_mae_jax"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$gpus"
  echo "#SBATCH --gpus-per-node=$gpus"
  echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$workdir/slurm/%j.out"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --requeue"
  [[ -n $partition ]] && echo "#SBATCH --partition=$partition"
  [[ -n $account ]] && echo "#SBATCH --account=$account"
  echo 'set -euo pipefail'
  echo "cd $(quote "$root")"
  if [[ -n $venv ]]; then
    # a node that does not mount the venv stops here with its path, not in srun with a missing module
    echo "[[ -f $(quote "$venv/bin/activate") ]] || { echo $(quote "error: no venv at $venv (--venv)") >&2; exit 1; }"
    echo "source $(quote "$venv")/bin/activate"
  fi
  echo "status=0"
  echo "srun python -m sce_mae_jax.main --distributed $(quote --config="$config" --workdir="$workdir" "$@") || status=\$?"
  echo 'if [[ $status -eq 143 ]]; then scontrol requeue "$SLURM_JOB_ID"; fi  # preempted: resume from its checkpoint'
  echo 'exit $status'
}

if [[ -n $dry ]]; then
  echo "# $script:"
  sbatch_script "$@"
  echo "# submitted with:"
else
  mkdir -p "$workdir/slurm"
  sbatch_script "$@" > "$script"
fi
run sbatch "$script"
