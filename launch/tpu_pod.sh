#!/usr/bin/env bash
# Runs one job on every host of a Cloud TPU pod slice. Each host executes the same command; --distributed makes
# jax.distributed.initialize() discover the pod. Checkpoints and data must be on storage every host sees
# (a gcsfuse mount, or gs:// with the gcsfs package).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/mae_deit_s.py:data=celeba /mnt/gcs/workdirs/mae_deit_s [--config.x=y ...]
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/sce_mae_jax && python -m sce_mae_jax.main --distributed --config=$config --workdir=$workdir $*"
