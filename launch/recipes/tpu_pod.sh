#!/usr/bin/env bash
# CASPO on a TPU VM pod slice (e.g. v5p-64: 8 hosts x 4 chips = 32 JAX devices).
#
# Every host runs the same command; JAX's Cloud TPU detection (caspo_jax.distributed,
# plan "tpu") finds the coordinator, process count and id, so there is nothing to pass.
# Size the run first, on any machine:
#   caspo dryrun --preset qwen2_5_vl_7b --topology v5p-64 --mesh 1,32,1
#
# usage: TPU_NAME=my-v5p-64 ZONE=us-east5-a RUN=gs://bucket/runs/caspo-7b bash tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${RUN:?set RUN (a gs:// path every host can write)}"
PRESET=${PRESET:-qwen2_5_vl_7b-start-sft}                    # CASPO from the SFT export (the headline run)
MODEL_DIR=${MODEL_DIR:-/mnt/models/sft-Qwen2.5-VL-7B/export}   # the caspo sft export, same path on every host
RM_DIR=${RM_DIR:-/mnt/models/rm-Qwen2.5-VL-7B/export}          # the caspo rm export (outcome reward, eq. 7)
REPO=${REPO:-https://example.invalid/caspo-jax.git}           # your clone of this repository
MESH=${MESH:-"--set run.mesh_data=1 --set run.mesh_fsdp=32 --set run.mesh_tensor=1"}

# 1. install on every host (one time)
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  python3 -m venv ~/caspo && . ~/caspo/bin/activate &&
  pip install -q 'jax[tpu]>=0.10,<0.11' && pip install -q -e ~/caspo-jax || (git clone $REPO ~/caspo-jax && pip install -q -e '~/caspo-jax[tpu]')"

# 2. train: the same command on all hosts at once; only process 0 logs and exports,
#    every host writes its checkpoint shards (orbax) under $RUN.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  . ~/caspo/bin/activate && cd ~/caspo-jax &&
  caspo train --preset $PRESET --set model.path=$MODEL_DIR --set reward.path=$RM_DIR --out $RUN $MESH"
