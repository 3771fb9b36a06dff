#!/usr/bin/env bash
# GPT-3 1.3B with random-LTD, as in Yao et al. 2022 (Table 1): layers 1..22 drop tokens, the kept length
# grows 128 -> 2048 in steps of 16 over 200k iterations (MSLG), LR warmup and cosine decay run on
# consumed layer-tokens (LayerToken LR), and training stops at 4800B layer-tokens: 2/3 of the dense
# baseline's 300B tokens x 24 layers = 7200B. `python tools/ltd_budget.py` with the same flags prints
# the plan (about 277k iterations, 291B tokens read); LAUNCH=echo prints this script's flags to paste there.
#
#   DATA_PATH=... VOCAB_FILE=... MERGE_FILE=... NNODES=8 GPUS_PER_NODE=8 bash examples/pretrain_gpt_1.3b_ltd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-gpt_1.3b_ltd}
source examples/gpt_1.3b_common.sh

LTD_START=${LTD_START:-128}
LTD_STEP=${LTD_STEP:-16}
LTD_RAMP_ITERS=${LTD_RAMP_ITERS:-200000}
TRAIN_LAYER_TOKENS=${TRAIN_LAYER_TOKENS:-4800e9}

mkdir -p "$OUT"
# shellcheck disable=SC2086  # word splitting of the argument strings is intended
$LAUNCH pretrain_gpt_ltd.py $COMMON_ARGS \
  --random-ltd --random-ltd-start-seq-length "$LTD_START" --random-ltd-seq-step "$LTD_STEP" \
  --random-ltd-ramp-iters "$LTD_RAMP_ITERS" --layer-token-lr-schedule \
  --train-layer-tokens "$TRAIN_LAYER_TOKENS" $EXTRA_ARGS 2>&1 | tee -a "$OUT/train.log"
