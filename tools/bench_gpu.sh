#!/usr/bin/env bash
# The GPU figures that docs/BENCHMARKS.md still lacks, in one run on one GPU (about 10 minutes on an H100/H200):
# DALI mixed two-view RandAugment vs DALI CPU vs torchvision (issue target >= 5,000 images/s), the ResNet-50 SupCon
# bf16 step against cross-entropy (>= 95% of its per-view rate, >= 4,500 views/s), fed by the DALI loader too, the
# largest per-GPU batch with and without activation checkpointing, ResNet-101/200 rates, and the loss on CUDA.
# Each tool writes its JSON into $OUT as it goes (bench_loss after every case) and status.jsonl gets one line per
# finished step, so a failing or killed step loses nothing that finished; the other steps still run.
#   make bench-gpu                     (or: OUT=runs/bench_gpu tools/bench_gpu.sh)
#   SMOKE=1 tools/bench_gpu.sh         tiny sizes on the CPU, to check the script itself (make test-slow does)
set -uo pipefail
OUT=${OUT:-runs/bench_gpu}
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}  # nproc counts the CPUs this job may use (its affinity)
mkdir -p "$OUT"
: > "$OUT/status.jsonl"
if [ -n "${SMOKE:-}" ]; then
  DEVICE=cpu; BACKENDS=dali-cpu,torchvision; FILES=64; LOADER_BATCH=8; SIZE=32; STEPS=1; WARMUP=0
  MAXB=16; MODELS="resnet18:8"; LOSS_VIEWS=1024; LOSS_LARGE=""; LOADER=dali-cpu
else
  # Per-model batch per GPU (two views each): ResNet-101 at 256 and ResNet-200 at 256 (~150 GB by
  # docs/BENCHMARKS.md's estimate) do not fit an 80 GB H100. The dense and matmul losses stop at M = 65,536
  # (a 16 GiB logits matrix); only the tiled loss, which never holds it, runs M = 262,144 (256 GiB dense).
  DEVICE=cuda; BACKENDS=dali-gpu,dali-cpu,torchvision; FILES=4096; LOADER_BATCH=256; SIZE=224; STEPS=20
  WARMUP=5; MAXB=4096; MODELS="resnet50:256 resnet101:128 resnet200:64"; LOSS_VIEWS=12288,65536
  LOSS_LARGE=262144; LOADER=dali
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
fi
status=0
step() {  # step NAME command...: run one benchmark, keep going on failure, remember it, log it to status.jsonl
  local name=$1 start rc
  shift
  echo "== $name"
  start=$(date +%s)
  "$@"
  rc=$?
  printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/status.jsonl"
  if [ "$rc" -ne 0 ]; then echo "!! failed ($rc): $*" >&2; status=1; fi
}
step dataloader "$PYTHON" tools/bench_dataloader.py --synthetic "$FILES" --synthetic-dir "$OUT/photos" \
  --backends "$BACKENDS" --batch-size "$LOADER_BATCH" --threads "$THREADS" --image-size "$SIZE" --batches 10 \
  --warmup 2 --repeats 1 --json "$OUT/dataloader.json"
first=1
for entry in $MODELS; do
  model=${entry%%:*}
  batch=${entry##*:}
  extra=()
  if [ "$first" = 1 ]; then  # the first model also: fed by the DALI loader, and the largest batch that fits
    extra=(--data "$OUT/photos" --backend "$LOADER" --workers "$THREADS" --max-batch "$MAXB" --lars)
  fi
  step "train $model" "$PYTHON" tools/bench_train.py --device "$DEVICE" --model "$model" --batch-per-gpu "$batch" \
    --image-size "$SIZE" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" "${extra[@]}" \
    --json "$OUT/train_$model.json"
  if [ "$first" = 1 ]; then
    step "train $model checkpointed" "$PYTHON" tools/bench_train.py --device "$DEVICE" --model "$model" \
      --batch-per-gpu "$batch" --image-size "$SIZE" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" \
      --activation-checkpointing --max-batch "$MAXB" --json "$OUT/train_${model}_ckpt.json"
  fi
  first=0
done
step loss "$PYTHON" tools/bench_loss.py --device "$DEVICE" --views "$LOSS_VIEWS" --impls matmul,tiled,dense \
  --repeats 2 --json "$OUT/loss.json"
if [ -n "$LOSS_LARGE" ]; then
  step "loss tiled large" "$PYTHON" tools/bench_loss.py --device "$DEVICE" --views "$LOSS_LARGE" --impls tiled \
    --repeats 2 --json "$OUT/loss_tiled_large.json"
fi
echo "JSON in $OUT (status.jsonl: one line per step)"
exit $status
