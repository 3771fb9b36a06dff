#!/usr/bin/env bash
# BERT-large with random-LTD, as LTD-2 of Yao et al. 2022 (Table 2): layers 1..22 drop tokens, the kept
# length grows 128 -> 512 in steps of 16, each length held for 38B tokens (72.5k iterations), so full length
# from iteration 1,739,500 of 2M. LR warmup and linear decay run on consumed layer-tokens (LayerToken LR):
# warmup until the layer-tokens of 10k dense iterations, decay to --min-lr exactly when the run's own
# layer-token total is consumed (no LR left undecayed). Same 2M iterations and data as the baseline,
# 31.1% fewer layer-tokens (`python tools/ltd_budget.py` with the same flags prints the plan).
#
#   DATA_PATH=... VOCAB_FILE=... NNODES=8 GPUS_PER_NODE=8 bash examples/pretrain_bert_large_ltd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-bert_large_ltd}
source examples/bert_large_common.sh

LTD_START=${LTD_START:-128}
LTD_STEP=${LTD_STEP:-16}
LTD_RAMP_ITERS=${LTD_RAMP_ITERS:-1739500}  # 24 lengths x 38B tokens / (1024 x 512 tokens per iteration)
LTD_ARGS="--random-ltd --random-ltd-start-seq-length $LTD_START --random-ltd-seq-step $LTD_STEP \
  --random-ltd-ramp-iters $LTD_RAMP_ITERS"
# The layer-tokens TRAIN_ITERS iterations consume: the LayerToken LR decays over exactly this budget.
TRAIN_LAYER_TOKENS=${TRAIN_LAYER_TOKENS:-$("$PYTHON" tools/ltd_budget.py --num-layers "$NUM_LAYERS" \
  --seq-length "$SEQ" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" $LTD_ARGS --json \
  | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["layer_tokens"])')}

mkdir -p "$OUT"
# shellcheck disable=SC2086  # word splitting of the argument strings is intended
$LAUNCH pretrain_bert_ltd.py $COMMON_ARGS $LTD_ARGS --layer-token-lr-schedule \
  --train-layer-tokens "$TRAIN_LAYER_TOKENS" $EXTRA_ARGS 2>&1 | tee -a "$OUT/train.log"
