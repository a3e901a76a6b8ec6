#!/usr/bin/env bash
# The GPU figures that docs/BENCHMARKS.md still lacks, in one run on one GPU (about 10 minutes on an H100/H200):
# DALI mixed two-view RandAugment vs DALI CPU vs torchvision (issue target >= 5,000 images/s), the ResNet-50 SupCon
# bf16 step against cross-entropy (>= 95% of its per-view rate, >= 4,500 views/s), fed by the DALI loader too, the
# largest per-GPU batch with and without activation checkpointing, ResNet-101/200 rates, and the loss up to
# M = 262,144 views on CUDA. Each tool writes JSON into $OUT; a failing step is reported and the others still run.
#   make bench-gpu                     (or: OUT=runs/bench_gpu tools/bench_gpu.sh)
#   SMOKE=1 tools/bench_gpu.sh         tiny sizes on the CPU, to check the script itself (make test does)
set -uo pipefail
OUT=${OUT:-runs/bench_gpu}
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
mkdir -p "$OUT"
if [ -n "${SMOKE:-}" ]; then
  DEVICE=cpu; BACKENDS=dali-cpu,torchvision; FILES=64; BATCH=8; LOADER_BATCH=8; SIZE=32; STEPS=1; WARMUP=0
  MAXB=16; MODELS="resnet18"; LOSS_VIEWS=1024; LOADER=dali-cpu
else
  DEVICE=cuda; BACKENDS=dali-gpu,dali-cpu,torchvision; FILES=4096; BATCH=256; LOADER_BATCH=256; SIZE=224; STEPS=20
  WARMUP=5; MAXB=4096; MODELS="resnet50 resnet101 resnet200"; LOSS_VIEWS=12288,65536,262144; LOADER=dali
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
fi
status=0
step() {  # step NAME command...: run one benchmark, keep going on failure, remember it
  echo "== $1"
  shift
  "$@" || { echo "!! failed: $*" >&2; status=1; }
}
step dataloader "$PYTHON" tools/bench_dataloader.py --synthetic "$FILES" --synthetic-dir "$OUT/photos" \
  --backends "$BACKENDS" --batch-size "$LOADER_BATCH" --threads "$THREADS" --image-size "$SIZE" --batches 10 \
  --warmup 2 --repeats 1 --json "$OUT/dataloader.json"
first=1
for model in $MODELS; do
  extra=()
  if [ "$first" = 1 ]; then  # the first model also: fed by the DALI loader, and the largest batch that fits
    extra=(--data "$OUT/photos" --backend "$LOADER" --workers "$THREADS" --max-batch "$MAXB" --lars)
  fi
  step "train $model" "$PYTHON" tools/bench_train.py --model "$model" --batch-per-gpu "$BATCH" --image-size "$SIZE" \
    --precision bf16 --steps "$STEPS" --warmup "$WARMUP" "${extra[@]}" --json "$OUT/train_$model.json"
  if [ "$first" = 1 ]; then
    step "train $model checkpointed" "$PYTHON" tools/bench_train.py --model "$model" --batch-per-gpu "$BATCH" \
      --image-size "$SIZE" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" --activation-checkpointing \
      --max-batch "$MAXB" --json "$OUT/train_${model}_ckpt.json"
  fi
  first=0
done
step loss "$PYTHON" tools/bench_loss.py --device "$DEVICE" --views "$LOSS_VIEWS" --impls matmul,tiled,dense \
  --repeats 2 --json "$OUT/loss.json"
echo "JSON in $OUT"
exit $status
