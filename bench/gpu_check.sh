#!/usr/bin/env bash
# One-GPU performance check for a lent GPU machine (no downloads, synthetic data, < 8 min).
#   bash bench/gpu_check.sh            # writes to $OUT if set, else bench/results/gpu
# Stages, each bounded by `timeout` so that earlier results survive a slow later stage:
#   1. training images/s + peak memory, celeba32 and celeba64 at full size:
#      fp32 (TF32 off) | TF32 | bf16 autocast | bf16 + channels_last   (+ conv-FLOP fraction of bf16 peak)
#   2. evaluation fast path vs training forward, celeba32 and celeba64
#   3. torch.compile (bf16) at full size; cold compile included in "warm-up s"
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
{
  echo "gpu_check $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  # The package itself (no dependencies: the machine has torch, numpy, pyyaml, click; nothing can be fetched).
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2 || echo "pip install failed; using PYTHONPATH"
  "$PY" -c "import torch, glow.model; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$LOG"

stage() {  # stage <seconds> <description> <command...>
  local limit=$1 what=$2; shift 2
  echo "== $what (limit ${limit}s, elapsed $(( $(date +%s) - start ))s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $what: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

stage 200 "train: fp32 / tf32 / bf16 / bf16+channels_last" \
  "$PY" bench/train_throughput.py --device cuda --configs celeba32,celeba64 \
    --variants eager,tf32,bf16,bf16+channels_last --repeats 3 --steps 5 --warmup 3 --out-dir "$OUT_DIR"
stage 80 "eval: fast path vs training forward" \
  "$PY" bench/eval_throughput.py --device cuda --configs celeba32,celeba64 \
    --variants train_forward,eval_no_grad,eval_fast --repeats 3 --steps 5 --warmup 2 --out-dir "$OUT_DIR"
left=$(( 450 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  stage "$left" "train: bf16 + torch.compile (cold compile in warm-up s)" \
    "$PY" bench/train_throughput.py --device cuda --configs celeba32,celeba64 \
      --variants bf16,bf16+compile --repeats 3 --steps 5 --warmup 3 --out-dir "$OUT_DIR" --tag compile
else
  echo "== skipped compile stage: only ${left}s left" | tee -a "$LOG"
fi
echo "gpu_check done in $(( $(date +%s) - start ))s; results in $OUT_DIR" | tee -a "$LOG"
ls -l "$OUT_DIR" | tee -a "$LOG"
