#!/usr/bin/env bash
# One job on every GPU of this machine, in one process: JAX sees all local GPUs as devices of one mesh, so
# no --distributed is needed. Checks first that JAX has the GPU backend (a CPU-only JAX would run, slowly).
#   launch/gpu_host.sh [--dry_run] [--install] [--gpus=0,1,...] CONFIG WORKDIR [--config.x=y ...]
# --install: pip install -e ".[cuda]" first (CUDA 12 wheels; use ".[cuda13]" by hand for a CUDA 13 driver).
# --gpus: only these GPUs (CUDA_VISIBLE_DEVICES); default all.
set -euo pipefail
source "$(dirname "$0")/common.sh"
dry='' install='' gpus=''
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry_run) dry=1 ;;
    --install) install=1 ;;
    --gpus=*) gpus=${1#*=} ;;
    *) echo "error: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry_run] [--install] [--gpus=0,1] CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
env_prefix=()
[[ -n $gpus ]] && env_prefix=(env CUDA_VISIBLE_DEVICES="$gpus")
if [[ -n $install ]]; then run "$python" -m pip install -e ".[cuda]"; fi
run nvidia-smi -L
run "${env_prefix[@]}" "$python" -m sce_mae_jax.hardware gpu  # stops here if JAX would run on the CPU
run "${env_prefix[@]}" "$python" -m sce_mae_jax.main --config="$config" --workdir="$workdir" "$@"
