#!/usr/bin/env bash
# Step time of a tiny GPT under torchrun on the CPU (gloo), in every parallel layout, dense and random-LTD.
#
# What it shows: the cost of the parallel machinery (process groups, TP all-reduces, 1F1B p2p, the DP
# gradient all-reduce) at a size where communication and Python overhead dominate. It says nothing about
# GPU speed-ups. Layouts: one process, TP=2, PP=2, DP=2 (2 ranks each) and TP=2 x PP=2 (4 ranks). Every
# rank runs one thread (OMP_NUM_THREADS=1), so the single process uses one core, the 2-rank layouts both
# cores of a 2-core machine, and the 4-rank layout OVERSUBSCRIBES it (4 ranks on 2 cores).
#
# Model: 4 layers, hidden 64, 4 heads, seq 64, micro batch 2, global batch 8 (so 4 micro-batches per DP
# rank, 2 with DP=2), mock data, NullTokenizer --vocab-size 1000, fp32, 20 iterations, no evaluation.
# Random-LTD: layers 1-2 keep r = 32 of the 64 tokens throughout (--random-ltd-ramp-iters 10^8).
# Reported: the median of `elapsed_ms_per_iteration` (the logging rank's wall time of one train_step:
# forward, backward, gradient sync and optimizer step) over iterations SKIP+1..ITERS, from --log-json.
#
# Only meaningful on an otherwise idle machine: check `uptime` first and rerun if the numbers jump.
#   bash bench/parallel_cpu_step_time.sh                # ~1-2 min; OUT=/tmp/parallel_cpu_step_time
#   REPEATS=3 bash bench/parallel_cpu_step_time.sh      # each configuration 3 times; median of the medians
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
TORCHRUN=${TORCHRUN:-$(dirname "$PYTHON")/torchrun}
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
OUT=${OUT:-/tmp/parallel_cpu_step_time}
ITERS=${ITERS:-20}
SKIP=${SKIP:-5}
REPEATS=${REPEATS:-1}
export MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 PYTHONPATH=$PWD
rm -rf "$OUT"; mkdir -p "$OUT"

ARGS="--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2
  --global-batch-size 8 --lr 1e-4 --train-iters $ITERS --tokenizer-type NullTokenizer --vocab-size 1000
  --mock-data --num-workers 0 --log-interval 1 --eval-iters 0 --distributed-backend gloo"
LTD="--random-ltd --random-ltd-start-seq-length 32 --random-ltd-seq-step 16 --random-ltd-ramp-iters 100000000"
# name  ranks  tp  pp
LAYOUTS="single:1:1:1 tp2:2:2:1 pp2:2:1:2 dp2:2:1:1 tp2pp2:4:2:2"

echo "$(date -u '+%Y-%m-%d %H:%M UTC')  $(uname -n)  $(getconf _NPROCESSORS_ONLN) cores  load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq 1 "$REPEATS"); do
  for layout in $LAYOUTS; do
    IFS=: read -r name ranks tp pp <<< "$layout"
    for mode in dense ltd; do
      extra=""; [ "$mode" = ltd ] && extra=$LTD
      log="$OUT/${name}_${mode}_$rep"
      cut -d' ' -f1 /proc/loadavg >> "$OUT/loadavg_1min"  # the 1-minute load just before each run
      # shellcheck disable=SC2086  # word splitting of the argument strings is intended
      "$TORCHRUN" --standalone --nproc_per_node "$ranks" pretrain_gpt_ltd.py $ARGS $extra \
        --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp" --log-json "$log.jsonl" \
        > "$log.log" 2>&1 || { echo "FAILED: $name $mode (see $log.log)"; tail -20 "$log.log"; exit 1; }
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PYTHON" - "$OUT" "$SKIP" "$REPEATS" "$LAYOUTS" <<'PY'
import json, statistics, sys
out, skip, repeats, layouts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()

def median_ms(name, mode):
    per_rep = []
    for rep in range(1, repeats + 1):
        rows = [json.loads(l) for l in open(f"{out}/{name}_{mode}_{rep}.jsonl") if '"lm_loss"' in l]
        per_rep.append(statistics.median(r["elapsed_ms_per_iteration"] for r in rows if r["iteration"] > skip))
    return statistics.median(per_rep), per_rep

loads = [float(x) for x in open(f"{out}/loadavg_1min")]
print(f"\n1-minute load average before each run: {min(loads):.2f} to {max(loads):.2f}")
print(f"median ms per iteration over iterations {skip + 1}.., {repeats} run(s) each")
extra_col = " each run, dense / LTD |" if repeats > 1 else ""
print("| layout | ranks | dense ms/iter | random-LTD ms/iter | LTD / dense |" + extra_col)
print("|---|---|---|---|---|" + ("---|" if repeats > 1 else ""))
for layout in layouts:
    name, ranks, tp, pp = layout.split(":")
    dp = int(ranks) // (int(tp) * int(pp))
    (d, d_all), (l, l_all) = median_ms(name, "dense"), median_ms(name, "ltd")
    runs = f" {', '.join(f'{x:.1f}' for x in d_all)} / {', '.join(f'{x:.1f}' for x in l_all)} |" if repeats > 1 else ""
    print(f"| tp={tp} pp={pp} dp={dp} | {ranks} | {d:.1f} | {l:.1f} | {l / d:.2f} |{runs}")
PY
