#!/usr/bin/env bash
# Training under the deepspeed launcher (it ssh-es into every host of the hostfile and sets RANK/WORLD_SIZE/
# LOCAL_RANK, which supcon_scale.distributed reads). engine.name=deepspeed is forced; LARS needs engine.zero_stage=0.
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/imagenet/supcon_resnet50.yaml [key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module supcon_scale.cli train --config "$CONFIG" engine.name=deepspeed engine.zero_stage=0 train.resume=auto "$@"
