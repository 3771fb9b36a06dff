#!/usr/bin/env bash
# The whole one-GPU measurement of docs/PERFORMANCE.md §11 in one run of at most ~8 minutes (BUDGET) on
# one H100/H200, into a FRESH folder (never appended to an old run) of five files:
#   summary.md              everything below, as tables
#   run.log                 every command's full output, in order
#   r2048.jsonl r1024.jsonl r512.jsonl    the trainer's --log-json of the three trainer runs
# Steps:
#  0. The trainer's host draw of random-LTD indices (numpy) against the torch draw on the GPU: identical.
#  1. Which attention kernel SDPA runs (torch.profiler's aten op and kernel names) and its fwd+bwd time,
#     for dropout 0 and 0.1 (the recipe's) at n = 2048 (dense) and 512 (r/s = 1/4): bf16, b 4, 16 heads,
#     head dim 128, causal, as the model calls it.
#  2. bench/ltd_step_time.py at the 1.3B layer shape (h 2048, 16 heads, s 2048, b 4, L 4 and 8, r/s 1/4
#     and 1/2, bf16, dropout 0.1) with the old and the new random-LTD routing side by side on one model
#     (`--routing both`; a version of the script without the switch runs once, as it is).
#  3. pretrain_gpt_ltd.py on the 24-layer GPT-3 1.3B shape (h 2048, 16 heads, s 2048, vocab 50257, mock
#     data), bf16, --use-distributed-optimizer, --torch-compile, --log-throughput, --timing-log-level 1,
#     hidden and attention dropout 0.1, micro batch 4 and global batch 32 (8 micro-batches per step, so the
#     optimizer's share is a training step's): dense, then random-LTD at a constant r = 1024 and r = 512 on
#     layers 1-22. Per run: median ms/iteration, TFLOP/s and MFU (the trainer's, against --peak-tflops or
#     the GPU's bf16 peak) over iterations WARMUP+1..ITERS, the compile time, the optimizer's share, peak
#     memory; then the realised saving of each LTD run:
#        realised = wall-clock saving / theoretical layer-token saving     (the paper's 0.77; target 0.9)
#        wall-clock saving = 1 - t_r / t_dense;  layer-token saving = (22/24) (1 - r/s)
#     and the same against the FLOP saving 1 - F_r / F_dense (which counts the head and attention).
# Single process, no torchrun needed (one GPU needs no process group).
#
#   bash bench/gpu_check.sh                    # OUT=/tmp/gpu_check.<time>
#   OUT=/path/fresh ITERS=16 PEAK_TFLOPS=989 bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --cpu-smoke        # the whole script on a CPU with tiny shapes (< 1 min)
set -euo pipefail
SMOKE=0
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/gpu_check.$(date +%Y%m%d-%H%M%S)}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac  # relative to where it was called from
[ -e "$OUT" ] && { echo "$OUT exists: give a fresh OUT (results are never appended to old runs)" >&2; exit 1; }
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)  # scratch (per-run stdout, tables), removed at exit
trap 'rm -rf "$WORK"' EXIT
BUDGET=${BUDGET:-480}  # seconds for the whole script; a step that would start past it is skipped
DROPOUT=${DROPOUT:-0.1}
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; DTYPE=fp32; BACKEND=gloo; PRECISION=""
  L=4; H=64; NH=4; S=64; MBS=2; GBS=4; V=1000; KEEPS="32 16"; ITERS=${ITERS:-3}; WARMUP=${WARMUP:-1}
  SDPA="--batch 2 --heads 4 --head-dim 16 --seq 64,16"
  LTD_STEP="--hidden 64 --heads 4 --seq 64 --layers 4 --batch 2 --vocab 256 --steps 1 --threads 1"
  PEAK=${PEAK_TFLOPS:-1}  # a made-up CPU peak, so the MFU path runs
else
  DEVICE=cuda; DTYPE=bf16; BACKEND=nccl; PRECISION="--bf16"
  L=24; H=2048; NH=16; S=2048; MBS=4; GBS=32; V=50257; KEEPS="1024 512"; ITERS=${ITERS:-12}; WARMUP=${WARMUP:-4}
  SDPA="--batch 4 --heads 16 --head-dim 128 --seq 2048,512"
  LTD_STEP="--hidden 2048 --heads 16 --seq 2048 --layers 4,8 --batch 4 --steps 10"
  PEAK=${PEAK_TFLOPS:-}  # empty: the trainer's default for the GPU (989 for H100/H200 bf16)
fi

log() { echo "$*" | tee -a "$OUT/run.log"; }
left() { echo $((BUDGET - SECONDS)); }
# run NAME TIMEOUT CMD...: the command's output into run.log (and $WORK/NAME.out); a failure is noted, not fatal
run() {
  local name=$1 limit=$2 rc=0; shift 2
  [ "$(left)" -lt 20 ] && { log "== $name: SKIPPED (budget of ${BUDGET}s spent)"; echo skipped > "$WORK/$name.failed"; return 0; }
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  log "== $name ($(date +%T), at most ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.out" 2>&1 || rc=$?
  cat "$WORK/$name.out" >> "$OUT/run.log"
  if [ "$rc" != 0 ]; then
    log "== $name: FAILED (exit $rc$([ "$rc" = 124 ] && echo ', timeout'))"; tail -5 "$WORK/$name.out"
    echo "$rc" > "$WORK/$name.failed"
  fi
}

{
  echo "# bench/gpu_check.sh $(date '+%Y-%m-%d %H:%M')$([ "$SMOKE" = 1 ] && echo ' (--cpu-smoke: tiny shapes on the CPU)')"
  echo
  [ "$SMOKE" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$WORK/head.md" 2>&1
cat "$WORK/head.md" >> "$OUT/run.log"

# ---- 0. the host draw against the device draw ------------------------------------------------------------
cat > "$WORK/draw.py" <<'PY'
"""The numpy twin of the random-LTD hash (the trainer's host draw) against the torch draw on the device."""
import sys, torch
from megatron.core.random_ltd.sampler import kept_indices_for_layers, kept_indices_host
dev, rows = torch.device(sys.argv[1]), []
for seed, t, s, r in [(1234, 0, 2048, 1024), (2**63 + 5, 2**33, 4096, 1000), (0, 7, 197, 66)]:
    ids, layers = torch.arange(64), list(range(1, 23))
    host = torch.from_numpy(kept_indices_host(seed, t, ids.numpy(), layers, s, r)).long()
    device = kept_indices_for_layers(seed, t, ids.to(dev), layers, s, r).cpu()
    rows.append(f"| {seed} | {t} | {s} | {r} | {'identical' if torch.equal(host, device) else '**DIFFERENT**'} |")
print(f"Host draw (numpy) against the torch draw on {dev}, 64 samples x 22 layers:\n")
print("| seed | iteration | s | r | indices |\n|---|---|---|---|---|\n" + "\n".join(rows))
PY
run draw 60 $PY "$WORK/draw.py" $DEVICE

# ---- 1. the SDPA backend --------------------------------------------------------------------------------
cat > "$WORK/sdpa.py" <<'PY'
"""Which kernel F.scaled_dot_product_attention runs, fwd + bwd, causal, per (n, dropout)."""
import argparse, statistics, time
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

p = argparse.ArgumentParser()
p.add_argument("--device"); p.add_argument("--dtype"); p.add_argument("--batch", type=int)
p.add_argument("--heads", type=int); p.add_argument("--head-dim", type=int); p.add_argument("--seq")
p.add_argument("--dropouts", default="0,0.1"); p.add_argument("--out")
a = p.parse_args()
table = open(a.out, "w")
dev, dtype = torch.device(a.device), torch.bfloat16 if a.dtype == "bf16" else torch.float32
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
print("| n | dropout | aten op | kernels (fwd + bwd) | ms fwd+bwd |\n|---|---|---|---|---|", file=table)
for n in map(int, a.seq.split(",")):
    for drop in map(float, a.dropouts.split(",")):
        q, k, v = (torch.randn(a.batch, a.heads, n, a.head_dim, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        def step():
            F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True).sum().backward()
        for _ in range(3):
            step()
        sync()
        times = []
        for _ in range(10):
            t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(); sync()
        names = [e.key for e in prof.key_averages()]
        ops = sorted({x for x in names if x.startswith("aten::_scaled_dot_product") or x.startswith("aten::_flash")
                      or x.startswith("aten::_efficient") or x.startswith("aten::_cudnn")})
        kernels = sorted({x for x in names if dev.type == "cuda" and not x.startswith("aten::")
                          and any(w in x.lower() for w in ("flash", "fmha", "attention", "cudnn", "sdpa", "softmax"))})
        short = lambda s: s if len(s) < 60 else s[:57] + "..."
        print(f"| {n} | {drop:g} | {', '.join(ops) or 'math (no fused op)'} | "
              f"{'<br>'.join(map(short, kernels)) or 'n/a'} | {1e3 * statistics.median(times):.2f} |", file=table)
PY
# shellcheck disable=SC2086  # word splitting of the shape strings is intended
run sdpa 60 $PY "$WORK/sdpa.py" --device $DEVICE --dtype $DTYPE $SDPA --out "$WORK/sdpa.md"

# ---- 2. random-LTD step time, old and new routing ----------------------------------------------------
ROUTING=""
case $($PY bench/ltd_step_time.py --help 2>/dev/null || true) in *--routing*) ROUTING="--routing both" ;; esac
# shellcheck disable=SC2086
run ltd_step_time 150 $PY bench/ltd_step_time.py --device $DEVICE --dtype $DTYPE $LTD_STEP \
  --keep-fractions 0.25,0.5 --dropout "$DROPOUT" $ROUTING --markdown "$WORK/ltd_step_time.md"

# ---- 3. the trainer: dense, r/s = 1/2, r/s = 1/4 ------------------------------------------------------
ARGS="--num-layers $L --hidden-size $H --num-attention-heads $NH --seq-length $S --max-position-embeddings $S
  --micro-batch-size $MBS --global-batch-size $GBS --vocab-size $V --tokenizer-type NullTokenizer --mock-data
  --num-workers 2 --init-method-std 0.013 --lr 2e-4 --min-lr 1e-6 --lr-decay-style cosine --adam-beta1 0.9
  --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout $DROPOUT --attention-dropout $DROPOUT
  --seed 1234 --train-iters $ITERS --log-interval 1 --eval-iters 0 --distributed-backend $BACKEND $PRECISION
  --use-distributed-optimizer --torch-compile --log-throughput --timing-log-level 1"
[ -n "$PEAK" ] && ARGS="$ARGS --peak-tflops $PEAK"
for keep in $S $KEEPS; do
  extra=""
  [ "$keep" != "$S" ] && extra="--random-ltd --random-ltd-start-seq-length $keep --random-ltd-ramp-iters 100000000"
  # shellcheck disable=SC2086
  run "r$keep" 240 $PY pretrain_gpt_ltd.py $ARGS $extra --log-json "$OUT/r$keep.jsonl"
done

# ---- summary ----------------------------------------------------------------------------------------
$PY - "$OUT" "$WORK" "$WARMUP" "$S" $S $KEEPS > "$OUT/summary.md" <<'PY'
import json, os, re, statistics, sys
out, work, warm, s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keeps = [int(k) for k in sys.argv[5:]]
read = lambda p: open(p).read() if os.path.exists(p) else ""
failed = lambda name: read(os.path.join(work, name + ".failed")).strip()
print(read(os.path.join(work, "head.md")))
print("## 0. Random-LTD draw: host against device\n")
print(f"FAILED ({failed('draw')}), see run.log\n" if failed("draw") else read(os.path.join(work, "draw.out")))
print("## 1. SDPA backend (causal, fwd + bwd)\n")
print(f"FAILED ({failed('sdpa')}), see run.log\n" if failed("sdpa") else read(os.path.join(work, "sdpa.md")))
print("## 2. bench/ltd_step_time.py, old and new routing\n")
md = read(os.path.join(work, "ltd_step_time.md"))
print(f"FAILED ({failed('ltd_step_time') or 'no table'}), see run.log\n" if failed("ltd_step_time") or not md else md)
print("## 3. The trainer on the 24-layer 1.3B shape\n")
print(f"Medians over iterations {warm + 1}.. of each run; dropout, compile and the optimizer as in training.\n")
print("| r | r/s | ms/iter | TFLOP/s/GPU run | dense-equivalent TFLOP/s/GPU | MFU | dense-equivalent MFU | "
      "optimizer % | compile s | peak GiB | wall saving | layer-token saving | realised (÷ layer-token) | "
      "FLOP saving | realised (÷ FLOP) |")
print("|" + "---|" * 15)
dense = None
for k in keeps:
    name = f"r{k}"
    rows = [json.loads(l) for l in read(os.path.join(out, name + ".jsonl")).splitlines() if '"lm_loss"' in l]
    rows = [r for r in rows if r["iteration"] > warm] or rows
    if failed(name) or not rows:
        print(f"| {k} | {k / s:.2f} | FAILED ({failed(name) or 'no records'}), see run.log |" + " |" * 12)
        continue
    med = lambda key: statistics.median(r[key] for r in rows if key in r) if any(key in r for r in rows) else float("nan")
    ms = med("elapsed_ms_per_iteration")
    opt = statistics.median(r["timers_ms"]["optimizer"][1] for r in rows if "optimizer" in r.get("timers_ms", {})) \
        if any("optimizer" in r.get("timers_ms", {}) for r in rows) else float("nan")
    log = read(os.path.join(work, name + ".out"))
    comp = re.search(r"torch\.compile: (\d+) graphs compiled in ([\d.]+) s", log)
    mem = re.search(r"max allocated: ([\d.]+)", log)
    run, dense_eq = med("throughput_tflops"), med("dense_equivalent_tflops")
    tf = lambda x: f"{x:.1f}" if x >= 1 else f"{x:.3g}"  # a CPU's (smoke) few GFLOP/s legible too
    cells = [f"{k}", f"{k / s:.2f}", f"{ms:.1f}", tf(run), tf(dense_eq), f"{100 * med('mfu'):.1f} %",
             f"{100 * med('dense_equivalent_mfu'):.1f} %", f"{100 * opt / ms:.1f}",
             comp.group(2) if comp else "n/a", f"{float(mem.group(1)) / 1024:.1f}" if mem else "n/a"]
    if k == s:
        dense = ms
        cells += ["-"] * 5
    elif dense:
        wall = 1 - ms / dense
        tokens = rows[-1]["layer_token_saving"]  # constant r: (LTD layers / L) (1 - r/s)
        flop = 1 - run / dense_eq  # same time in both: 1 - F_r / F_dense
        cells += [f"{100 * wall:.1f} %", f"{100 * tokens:.1f} %", f"**{wall / tokens:.2f}**", f"{100 * flop:.1f} %",
                  f"{wall / flop:.2f}"]
    else:
        cells += ["n/a"] * 5
    print("| " + " | ".join(cells) + " |")
print("\nTargets (issue 15): realised ≥ 0.9 at r/s = 1/2; dense MFU ≥ 50 % of 989 TFLOP/s.")
PY
cat "$OUT/summary.md"
echo "results: $OUT/summary.md (logs: $OUT/run.log); $(( SECONDS ))s"
