#!/usr/bin/env bash
# Multi-node training with torchrun and c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 NPROC_PER_NODE=8 \
#     launch/torchrun_multinode.sh imagenet/supcon_resnet50 [key=value ...]
# The trainer resumes from its newest checkpoint by itself (train.resume=auto is passed), so torchrun's
# --max-restarts can restart every worker with the same arguments. `supcon-scale torchrun` is torchrun (same
# arguments) that exits 3 when the job checkpointed after a preemption signal (plain torchrun exits 1).
#
# Elastic: NNODES=MIN:MAX (e.g. 2:4) lets torchrun restart the job on however many nodes are left after one is
# lost (or join new ones), between MIN and MAX; each restart resumes the newest checkpoint on the new world size
# (docs/RELIABILITY.md "Elastic resume"): data.global_batch_size stays, the per-rank batch changes, so it must be
# divisible by every world size the job may run on (NPROC_PER_NODE x MIN..MAX). Run the same command on every node:
#   NNODES=2:4 MASTER_ADDR=node0 NPROC_PER_NODE=8 MAX_RESTARTS=3 launch/torchrun_multinode.sh CONFIG
# RDZV_ID names the job (SLURM_JOB_ID under SLURM): the trainer's out_dir lock lets a restart of the same job (same
# id and rendezvous address, higher restart count) take over from its dead attempt, and refuses any other job.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}  # seconds torchrun waits for a preemption save before SIGKILL (default 30)
exec "$PYTHON" -m supcon_scale.cli torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-supcon}}" \
  --max_restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  -m supcon_scale.cli train --config "$CONFIG" train.resume=auto "$@"
