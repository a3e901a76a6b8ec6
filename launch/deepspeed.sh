#!/usr/bin/env bash
# Training under the deepspeed launcher, which sets RANK/WORLD_SIZE/LOCAL_RANK (read by supcon_scale.distributed).
# engine.name=deepspeed is forced; every ZeRO stage 0-2 is exact with LARS (docs/ENGINES.md).
#   from node 0, reaching the others by passwordless ssh (pdsh):
#     HOSTFILE=launch/hostfile.example launch/deepspeed.sh imagenet/supcon_resnet50 [key=value ...]
#   without ssh, the same command on every node (its line number in the hostfile, from 0):
#     NO_SSH=1 NODE_RANK=<r> MASTER_ADDR=node0 HOSTFILE=... launch/deepspeed.sh CONFIG [key=value ...]
#   one machine, all its GPUs (NUM_GPUS=k for fewer): launch/deepspeed.sh CONFIG [key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}
shift
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}
args=(--master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "$0: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
  MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")}
  args+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
  if [ -n "${NO_SSH:-}" ]; then
    args+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (the line of this node in the hostfile, from 0)}")
  fi
elif [ -n "${NUM_GPUS:-}" ]; then
  args+=(--num_gpus "$NUM_GPUS")
fi
exec "$DEEPSPEED" "${args[@]}" --module supcon_scale.cli train --config "$CONFIG" engine.name=deepspeed \
  train.resume=auto "$@"
