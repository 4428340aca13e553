#!/usr/bin/env bash
# A Cloud TPU pod slice from nothing to results and back: create it (queued resources), install this project
# with the tpu extra on every worker, run a config on all workers at once (--distributed: jax.distributed
# finds the pod by itself), follow the log, delete the slice.
#
#   launch/tpu_pod.sh [OPTIONS] create                         # queue the slice, wait until it is ACTIVE
#   launch/tpu_pod.sh [OPTIONS] install                        # copy this checkout (or --repo) to every worker
#   launch/tpu_pod.sh [OPTIONS] run CONFIG gs://BUCKET/RUN [--config.x=y ...]   # detached on every worker
#   launch/tpu_pod.sh [OPTIONS] logs                           # follow worker 0's log until the job ends
#   launch/tpu_pod.sh [OPTIONS] delete
#   launch/tpu_pod.sh [OPTIONS] all CONFIG gs://BUCKET/RUN [...]   # create, install, run, logs, delete
#
# OPTIONS: --name=NAME --zone=ZONE (required) --type=v5litepod-32 --version=v2-alpha-tpuv5-lite
#          --project=P --spot --repo=GIT_URL[@REF] (clone instead of copying this checkout) --keep (all: no
#          delete) --dry_run (print every command instead of running it)
# The workdir must be on GCS: every worker writes its checkpoint shards there and reruns resume from it.
set -euo pipefail

name='' zone='' type='v5litepod-32' version='v2-alpha-tpuv5-lite' project='' spot='' repo='' keep='' dry=''
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry_run) dry=1 ;;
    *) echo "error: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
action=${1:-}
[[ -n $action ]] && shift
if [[ -z $name || -z $zone ]]; then
  echo "error: --name and --zone are required (e.g. --name=sce-pod --zone=us-west4-a)" >&2; exit 2
fi

# Every command goes through `run`: printed (--dry_run, quoted so that it can be pasted) or executed.
source "$(dirname "$0")/common.sh"
gc=(gcloud compute tpus)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
ssh_all() { run "${gc[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"; }
remote_dir='~/sce_mae_jax'

create() {
  local extra=()
  [[ -n $spot ]] && extra+=(--spot)
  run "${gc[@]}" queued-resources create "$name" --node-id="$name" "${where[@]}" --accelerator-type="$type" \
    --runtime-version="$version" "${extra[@]}"
  if [[ -n $dry ]]; then  # the wait polls this until ACTIVE
    run "${gc[@]}" queued-resources describe "$name" "${where[@]}" --format='value(state.state)'
    return
  fi
  local state=''
  until [[ $state == ACTIVE ]]; do
    state=$("${gc[@]}" queued-resources describe "$name" "${where[@]}" --format='value(state.state)')
    case $state in FAILED|SUSPENDED) echo "error: queued resource $name is $state" >&2; exit 1 ;; esac
    echo "$(date +%T) $name: ${state:-unknown}; waiting for ACTIVE"
    [[ $state == ACTIVE ]] || sleep 30
  done
}

install() {
  if [[ -n $repo ]]; then
    local url=${repo%@*} ref=''
    [[ $repo == *@* ]] && ref=${repo##*@}
    ssh_all "rm -rf $remote_dir && git clone $url $remote_dir${ref:+ && git -C $remote_dir checkout $ref}"
  else  # this checkout as it is (tracked and untracked files, not what git ignores)
    local root tarball=/tmp/sce_mae_jax_$name.tar.gz
    root=$(cd "$(dirname "$0")/.." && pwd)
    local pack="git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $tarball"
    run bash -c "cd $(printf %q "$root") && $pack"
    run "${gc[@]}" tpu-vm scp "$tarball" "$name:sce_mae_jax.tar.gz" "${where[@]}" --worker=all
    ssh_all "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf ~/sce_mae_jax.tar.gz -C $remote_dir"
  fi
  ssh_all "cd $remote_dir && python3 -m pip install -q -e \".[tpu,gcs]\""
}

start() {
  if [[ $# -lt 2 ]]; then echo "error: run needs CONFIG and WORKDIR (gs://...)" >&2; exit 2; fi
  local config=$1 workdir=$2
  shift 2
  if [[ $workdir != gs://* ]]; then
    echo "error: the workdir must be on GCS (gs://BUCKET/PATH), which every worker sees; got $workdir" >&2; exit 2
  fi
  local cmd
  cmd="cd $remote_dir && nohup python3 -m sce_mae_jax.main --distributed $(printf '%q ' --config="$config" \
--workdir="$workdir" "$@")> run.log 2>&1 < /dev/null & echo \$! > run.pid; echo started on \$(hostname)"
  ssh_all "$cmd"
}

logs() {  # ends when worker 0's job does
  run "${gc[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 \
    --command="cd $remote_dir && tail -n +1 --pid=\$(cat run.pid) -f run.log"
}

delete() {
  run "${gc[@]}" queued-resources delete "$name" "${where[@]}" --force --quiet
}

case $action in
  create) create ;;
  install) install ;;
  run) start "$@" ;;
  logs) logs ;;
  delete) delete ;;
  all)
    create
    if [[ -z $keep && -z $dry ]]; then trap delete EXIT; fi  # a failed step still gives the slice back
    install
    start "$@"
    logs
    if [[ -z $keep && -n $dry ]]; then delete; fi
    ;;
  *) echo "error: unknown action '${action}'; choose one of create, install, run, logs, delete, all" >&2; exit 2 ;;
esac
