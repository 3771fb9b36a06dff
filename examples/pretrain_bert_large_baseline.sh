#!/usr/bin/env bash
# The dense BERT-large baseline for pretrain_bert_large_ltd.sh: same model, data, optimizer and 2M
# iterations (1049B tokens), no token dropping; LR warmup 10k iterations, linear decay to its own end.
#
#   DATA_PATH=... VOCAB_FILE=... NNODES=8 GPUS_PER_NODE=8 bash examples/pretrain_bert_large_baseline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_NAME=${RUN_NAME:-bert_large_baseline}
source examples/bert_large_common.sh

mkdir -p "$OUT"
# shellcheck disable=SC2086
$LAUNCH pretrain_bert_ltd.py $COMMON_ARGS $EXTRA_ARGS 2>&1 | tee -a "$OUT/train.log"
