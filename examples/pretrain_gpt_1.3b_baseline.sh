#!/usr/bin/env bash
# The dense GPT-3 1.3B baseline for pretrain_gpt_1.3b_ltd.sh: same model, data and optimizer, no token
# dropping, 300B tokens (7200B layer-tokens), LR warmup 3B tokens and cosine decay to its own budget.
#
#   DATA_PATH=... VOCAB_FILE=... MERGE_FILE=... NNODES=8 GPUS_PER_NODE=8 bash examples/pretrain_gpt_1.3b_baseline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-gpt_1.3b_baseline}
source examples/gpt_1.3b_common.sh

TRAIN_TOKENS=${TRAIN_TOKENS:-300e9}

mkdir -p "$OUT"
# shellcheck disable=SC2086
$LAUNCH pretrain_gpt_ltd.py $COMMON_ARGS --train-tokens "$TRAIN_TOKENS" $EXTRA_ARGS 2>&1 | tee -a "$OUT/train.log"
