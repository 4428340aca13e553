#!/usr/bin/env bash
# Simulates N hosts on this machine: N processes, each with D simulated CPU devices, meeting at 127.0.0.1.
#   launch/local_processes.sh [--dry_run] N D --config=configs/quickstart.py --workdir=/tmp/multi [--config.x=y ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage="usage: $0 [--dry_run] N D --config=CONFIG --workdir=DIR [--config.x=y ...]"
dry=''
if [[ ${1:-} == -h || ${1:-} == --help ]]; then echo "$usage"; exit 0; fi
if [[ ${1:-} == --dry_run ]]; then dry=1; shift; fi
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ || ! $2 =~ ^[0-9]+$ ]]; then
  echo "error: N and D (processes, CPU devices each) must come first; $usage" >&2; exit 2
fi
n=$1 d=$2
shift 2
port=$((20000 + RANDOM % 20000))
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(env XLA_FLAGS="--xla_force_host_platform_device_count=$d" JAX_PLATFORMS=cpu
       python -m sce_mae_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@")
  if [[ -n $dry ]]; then run "${cmd[@]}"; continue; fi
  "${cmd[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
