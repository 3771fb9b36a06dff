#!/usr/bin/env bash
# Peak GPU memory and step time of the 1.3B shape on ONE GPU (~3-5 min on an H100/H200): bf16 parameters
# (fp32 main parameters, Adam state and main_grad), then + full activation recomputation, then + the
# distributed optimizer. Results in one small file, $OUT/results.md; every run's log and JSON beside it.
#
# Shape and optimizer of examples/gpt_1.3b_common.sh (24 layers, hidden 2048, 16 heads, sequence 2048,
# micro batch 4, init std 0.013, Adam 0.9/0.95, weight decay 0.1, clip 1.0, --bf16), vocab 50257 (GPT-2,
# padded to 50304) through NullTokenizer and --mock-data; global batch 8 = 2 micro-batches per step, so
# gradients accumulate in main_grad as in training; no evaluation, no checkpoints.
#
#   config     extra flags
#   bf16       (none)
#   recompute  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
#   distopt    --use-distributed-optimizer. At dp = 1 it shards NOTHING: the one rank owns every shard, so
#              main parameters, Adam state and gradients are as large as without it; the run only checks
#              that the flat parameter buffer (param_data) costs no extra memory. The saving (the fp32 main
#              parameters and Adam state, 12 bytes/param, divided by dp) needs dp > 1.
#
# Per run: median ms per iteration over iterations WARMUP+1..ITERS (the trainer's --log-json), the
# trainer's own memory line ("memory (MB) | ... max allocated", printed once after the FIRST log, here
# iteration 1: it includes the first optimizer step but not a forward/backward with the Adam state already
# allocated), and torch.cuda.max_memory_allocated / max_memory_reserved at the end of the run (the peak
# over all iterations, read by a small wrapper that runs the trainer in-process).
#
#   bash bench/gpu_memory_step.sh                         # OUT=/tmp/gpu_memory_step.<time>, fresh each run
#   CONFIGS="bf16 recompute" ITERS=10 bash bench/gpu_memory_step.sh
#   TINY=1 bash bench/gpu_memory_step.sh                  # CPU, a 2-layer h=64 model: do the flags parse?
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_memory_step.$(date +%Y%m%d-%H%M%S)}
[ -e "$OUT" ] && { echo "$OUT exists: give a fresh OUT (results are never appended to old runs)" >&2; exit 1; }
mkdir -p "$OUT"
ITERS=${ITERS:-8}; WARMUP=${WARMUP:-3}; RUN_TIMEOUT=${RUN_TIMEOUT:-150}
CONFIGS=${CONFIGS:-"bf16 recompute distopt"}
if [ "${TINY:-0}" = 1 ]; then  # CPU smoke test of the flags: gloo, one process, tiny shape
  SHAPE="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64
    --micro-batch-size 2 --global-batch-size 4 --vocab-size 1000"
  BACKEND=gloo
else
  SHAPE="--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048
    --max-position-embeddings 2048 --micro-batch-size 4 --global-batch-size 8 --vocab-size 50257"
  BACKEND=nccl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt"
ARGS="$SHAPE --init-method-std 0.013 --lr 2e-4 --min-lr 1e-6 --lr-decay-style cosine --adam-beta1 0.9
  --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16 --tokenizer-type NullTokenizer --mock-data
  --num-workers 2 --seed 1234 --train-iters $ITERS --log-interval 1 --eval-iters 0
  --distributed-backend $BACKEND"

# The trainer in-process, then the CUDA allocator's peaks over the whole run.
cat > "$OUT/run_with_peak.py" <<'PY'
import json, os, runpy, sys
import torch
peak_file = sys.argv.pop(1)
sys.argv[0] = "pretrain_gpt_ltd.py"
try:
    runpy.run_path("pretrain_gpt_ltd.py", run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
with open(peak_file, "w") as f:
    json.dump({"max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
               "max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else None}, f)
PY

extra_flags() {
  case $1 in
    bf16) echo "" ;;
    recompute) echo "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1" ;;
    distopt) echo "--use-distributed-optimizer" ;;
    *) echo "unknown config $1 (bf16, recompute, distopt)" >&2; return 1 ;;
  esac
}

for name in $CONFIGS; do
  extra=$(extra_flags "$name")
  echo "== $name $extra"
  rc=0
  # shellcheck disable=SC2086  # word splitting of the argument strings is intended
  timeout -k 20 "$RUN_TIMEOUT" $PY -m torch.distributed.run --standalone --nproc_per_node 1 "$OUT/run_with_peak.py" \
    "$OUT/$name.peak.json" $ARGS $extra --log-json "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "$name: FAILED (exit $rc$([ "$rc" = 124 ] && echo ', timeout')); last lines of $OUT/$name.log:"
    tail -5 "$OUT/$name.log"
    echo "$rc" > "$OUT/$name.failed"
  fi
done

$PY - "$OUT" "$WARMUP" $CONFIGS <<'PY' | tee "$OUT/results.md"
import json, os, statistics, sys
out, warm, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"GPU: {open(os.path.join(out, 'gpu.txt')).read().strip()}")
print(f"Medians of iterations {warm + 1}.. of each run; memory in GiB.\n")
print("| config | ms/iter | tokens/s | trainer line: max allocated after iteration 1 | max allocated, whole run "
      "| max reserved, whole run |")
print("|---|---|---|---|---|---|")
for name in configs:
    base = os.path.join(out, name)
    if os.path.exists(base + ".failed"):
        print(f"| {name} | FAILED (exit {open(base + '.failed').read().strip()}, see {name}.log) | | | | |")
        continue
    rows = [json.loads(l) for l in open(base + ".jsonl") if '"lm_loss"' in l]
    timed = [r for r in rows if r["iteration"] > warm] or rows
    ms = statistics.median(r["elapsed_ms_per_iteration"] for r in timed)
    tps = statistics.median(r["tokens_per_sec"] for r in timed)
    line = next((l for l in open(base + ".log") if "max allocated:" in l), None)
    first = f'{float(line.split("max allocated:")[1].split("|")[0]) / 1024:.2f}' if line else "n/a"
    peak = json.load(open(base + ".peak.json"))
    gib = lambda mb: "n/a" if mb is None else f"{mb / 1024:.2f}"
    print(f"| {name} | {ms:.1f} | {tps:,.0f} | {first} | {gib(peak['max_allocated_mb'])} "
          f"| {gib(peak['max_reserved_mb'])} |")
PY
echo "results: $OUT/results.md"
