#!/usr/bin/env bash
# The whole GPU measurement of docs/PERFORMANCE.md §10 in one run (~4-6 minutes on one H100/H200):
# pretrain_gpt_ltd.py on a GPT-3 1.3B-shaped model (24 layers, hidden 2048, 16 heads, sequence 2048,
# vocab 50304), bf16, one GPU through torchrun and NCCL, mock data: dense, then random-LTD at constant
# r = 1024 and r = 512 of 2048 (layers 1..22 drop, as in the paper's recipe). Prints for each: median ms per
# iteration (iterations WARMUP+1..ITERS), tokens/s, peak GPU memory, and model FLOPs utilization:
#   dense-equivalent MFU  = F_dense / t / peak   (what the iteration would cost a dense model: LTD's "speed")
#   actual MFU            = F_ltd / t / peak     (FLOPs really executed: how well the smaller shapes run)
# with Megatron's causal count F = 3 x forward, forward per layer on n tokens 2bn(12h^2) + 2bn^2 h, head 2bshV.
#   bash bench/gpu_check.sh                        # results and logs in $OUT (default /tmp/gpu_check)
#   PEAK_TFLOPS=989 MBS=4 ITERS=25 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
L=${L:-24}; H=${H:-2048}; NH=${NH:-16}; S=${S:-2048}; MBS=${MBS:-4}; ITERS=${ITERS:-25}; WARMUP=${WARMUP:-10}
KEEPS=${KEEPS:-"1024 512"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
ARGS="--num-layers $L --hidden-size $H --num-attention-heads $NH --seq-length $S --micro-batch-size $MBS
  --global-batch-size $MBS --lr 1e-4 --train-iters $ITERS --tokenizer-type NullTokenizer --vocab-size 50257
  --mock-data --num-workers 2 --log-interval 1 --eval-iters 0 --bf16 --distributed-backend nccl
  --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.013"
for keep in $S $KEEPS; do
  extra=""; [ "$keep" != "$S" ] && extra="--random-ltd --random-ltd-start-seq-length $keep --random-ltd-ramp-iters 100000000"
  echo "== r = $keep"
  # shellcheck disable=SC2086
  torchrun --standalone --nproc_per_node 1 pretrain_gpt_ltd.py $ARGS $extra --log-json "$OUT/r$keep.jsonl" \
    > "$OUT/r$keep.log" 2>&1 || { tail -20 "$OUT/r$keep.log"; exit 1; }
  grep -m1 "training for" "$OUT/r$keep.log"
done
$PY - "$OUT" "$L" "$H" "$S" "$MBS" "$WARMUP" "${PEAK_TFLOPS:-989}" $S $KEEPS <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
out, L, h, s, b, warm = sys.argv[1], *map(int, sys.argv[2:7])
peak, keeps = float(sys.argv[7]), [int(k) for k in sys.argv[8:]]
V = 50304  # 50257 padded to a multiple of 128

def flops(keep):
    layer = lambda n: 2 * b * n * 12 * h * h + 2 * b * n * n * h
    return 3 * (sum(layer(keep if 0 < i < L - 1 else s) for i in range(L)) + 2 * b * s * h * V)

print(f"| r | r/s | ms/iter | tokens/s | vs dense | dense-equivalent MFU | actual MFU | peak memory GB |")
print("|---|---|---|---|---|---|---|---|")
dense_ms = None
for keep in keeps:
    rows = [json.loads(l) for l in open(f"{out}/r{keep}.jsonl") if '"lm_loss"' in l][warm:]
    ms = statistics.median(r["elapsed_ms_per_iteration"] for r in rows)
    dense_ms = dense_ms or ms
    mem = next((f'{float(l.split("max allocated:")[1].split("|")[0]) / 1024:.1f}' for l in open(f"{out}/r{keep}.log")
                if "max allocated:" in l), "n/a")  # the trainer's memory line after its first log
    print(f"| {keep} | {keep / s:.2f} | {ms:.1f} | {b * s / (ms / 1e3):,.0f} | {ms / dense_ms:.3f} | "
          f"{100 * flops(s) / (ms / 1e3) / (peak * 1e12):.1f} % | {100 * flops(keep) / (ms / 1e3) / (peak * 1e12):.1f} % "
          f"| {mem} |")
print(f"\nL={L} h={h} s={s} micro batch {b}, bf16, peak {peak:g} TFLOP/s; medians of iterations {warm + 1}..")
PY
