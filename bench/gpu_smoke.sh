#!/usr/bin/env bash
# The CUDA path, checked on a GPU machine in one go: device pick, bf16 parameters, random-LTD kernels,
# the unit tests on CUDA (including CPU == CUDA kept indices), and straight vs resumed training on the
# GPU. Writes its log and metrics under $OUT (default /tmp/gpu_smoke).
#   bash bench/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== unit tests on this machine (random-LTD, model, attention)"
$PY -m pytest -q -p no:cacheprovider tests/unit/random_ltd tests/unit/models tests/unit/transformer 2>&1 | tail -3

echo "== tiny GPT on the GPU: bf16 + random-LTD, 40 iterations straight, then 20 + resume + 20"
ARGS="--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --micro-batch-size 8
  --global-batch-size 16 --lr 1e-3 --lr-warmup-iters 5 --train-iters 40 --tokenizer-type NullTokenizer
  --vocab-size 1000 --mock-data --num-workers 2 --log-interval 5 --eval-interval 20 --eval-iters 2 --bf16
  --random-ltd --random-ltd-start-seq-length 64 --random-ltd-ramp-iters 30 --save-interval 20"
# shellcheck disable=SC2086
$PY pretrain_gpt_ltd.py $ARGS --save "$OUT/a" --log-json "$OUT/a.jsonl" 2>&1 | grep -v '^  [a-z_0-9]* \.\.\.' | tee "$OUT/a.log"
# shellcheck disable=SC2086
$PY pretrain_gpt_ltd.py $ARGS --save "$OUT/b" --log-json "$OUT/b.jsonl" --exit-interval 20 > "$OUT/b1.log" 2>&1
# shellcheck disable=SC2086
$PY pretrain_gpt_ltd.py $ARGS --save "$OUT/b" --load "$OUT/b" --log-json "$OUT/b.jsonl" > "$OUT/b2.log" 2>&1
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = lambda p: [json.loads(l) for l in open(p) if '"lm_loss"' in l]
a, b = rows(f"{out}/a.jsonl"), rows(f"{out}/b.jsonl")
print("iterations", [r["iteration"] for r in a] == [r["iteration"] for r in b], len(a))
print("device in log:", [l.strip() for l in open(f"{out}/a.log") if "training for" in l])
diff = max(abs(x["lm_loss"] - y["lm_loss"]) for x, y in zip(a, b))
print(f"max |loss straight - loss resumed| = {diff:.3e}; identical: {diff == 0.0}")
print("kept_length", [r["kept_length"] for r in a])
PY
