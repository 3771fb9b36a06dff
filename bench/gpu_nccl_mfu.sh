#!/usr/bin/env bash
# One GPU, the NCCL path: torchrun (1 process, --distributed-backend nccl), a mid-size GPT in bf16,
# dense and random-LTD at a constant r/s = 0.5; prints tokens/s and model FLOPs utilization.
# MFU uses Megatron's causal FLOP count, F = B*s*(72*L*h^2 + 6*L*h*s + 6*h*V) per iteration, against
# PEAK_TFLOPS (default 989, the dense bf16 peak of an H100/H200 SXM). Results under $OUT.
#   bash bench/gpu_nccl_mfu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_mfu}; mkdir -p "$OUT"
L=${L:-12}; H=${H:-1536}; NH=${NH:-16}; S=${S:-2048}; MBS=${MBS:-8}; ITERS=${ITERS:-30}
nvidia-smi --query-gpu=name --format=csv,noheader
ARGS="--num-layers $L --hidden-size $H --num-attention-heads $NH --seq-length $S --micro-batch-size $MBS
  --global-batch-size $MBS --lr 1e-4 --train-iters $ITERS --tokenizer-type NullTokenizer --vocab-size 50000
  --mock-data --num-workers 2 --log-interval 1 --eval-iters 0 --bf16 --distributed-backend nccl"
for mode in dense ltd; do
  extra=""; [ $mode = ltd ] && extra="--random-ltd --random-ltd-start-seq-length $((S / 2)) --random-ltd-ramp-iters 100000000"
  # shellcheck disable=SC2086
  torchrun --standalone --nproc_per_node 1 pretrain_gpt_ltd.py $ARGS $extra --log-json "$OUT/$mode.jsonl" \
    > "$OUT/$mode.log" 2>&1 || { tail -20 "$OUT/$mode.log"; exit 1; }
  grep -m1 "training for" "$OUT/$mode.log"
done
python3 - "$OUT" "$L" "$H" "$S" "$MBS" "${PEAK_TFLOPS:-989}" <<'PY'
import json, statistics, sys
out, L, h, s, B, peak = sys.argv[1], *map(int, sys.argv[2:6]), float(sys.argv[6])
V = 50048  # 50001 padded to a multiple of 128
F = B * s * (72 * L * h * h + 6 * L * h * s + 6 * h * V)
for mode in ("dense", "ltd"):
    rows = [json.loads(l) for l in open(f"{out}/{mode}.jsonl") if '"lm_loss"' in l][10:]  # skip warm-up
    ms = statistics.median(r["elapsed_ms_per_iteration"] for r in rows)
    tok = B * s / (ms / 1000)
    mfu = F / (ms / 1000) / (peak * 1e12)  # dense-model FLOPs: for LTD this is the dense-equivalent rate
    print(f"{mode:5s} L={L} h={h} s={s} b={B}: {ms:.1f} ms/iter, {tok:,.0f} tokens/s, "
          f"MFU (dense-equivalent, peak {peak:g} TF) {100 * mfu:.1f}%")
PY
