#!/usr/bin/env bash
# CPU quickstart: sample corpus -> tokenizer -> Megatron-format data -> a small GPT with random-LTD.
# Offline, about 5 minutes on 2 cores. Everything lands in $OUT (default runs/quickstart).
# Knobs (environment): OUT, PYTHON (default: python), TRAIN_ITERS (400), MAX_DOCS (all of the corpus),
# SPLIT (949,50,1), WARMUP_ITERS (TRAIN_ITERS / 10), LOG_INTERVAL (20), EVAL_INTERVAL (50),
# EVAL_ITERS (10), SAVE_INTERVAL (200), EXTRA_ARGS (more training flags, e.g. --exit-interval 50). tests/functional/test_quickstart.py runs a shrunken copy through these.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-400}
MAX_DOCS=${MAX_DOCS:-}
SPLIT=${SPLIT:-949,50,1}
WARMUP_ITERS=${WARMUP_ITERS:-$((TRAIN_ITERS / 10))}
LOG_INTERVAL=${LOG_INTERVAL:-20}
EVAL_INTERVAL=${EVAL_INTERVAL:-50}
EVAL_ITERS=${EVAL_ITERS:-10}
SAVE_INTERVAL=${SAVE_INTERVAL:-200}
mkdir -p "$OUT/data" "$OUT/tokenizer"

echo "== 1/4 sample corpus (text that ships with Python)"
"$PY" tools/make_sample_corpus.py --output "$OUT/data/corpus.jsonl" ${MAX_DOCS:+--max-docs "$MAX_DOCS"}

echo "== 2/4 tokenizer (GPT-2 style byte-level BPE, 8k)"
"$PY" tools/train_tokenizer.py --input "$OUT/data/corpus.jsonl" --type gpt2-bpe --vocab-size 8192 \
  --output-dir "$OUT/tokenizer"

echo "== 3/4 preprocess into Megatron's .bin/.idx"
"$PY" tools/preprocess_data.py --input "$OUT/data/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" \
  --merge-file "$OUT/tokenizer/merges.txt" --append-eod --workers 2 --log-interval 1000

echo "== 4/4 train a 4-layer GPT with random-LTD on CPU"
rm -rf "$OUT/metrics.jsonl" "$OUT/tensorboard"  # a rerun starts fresh logs (one event file, not two)
"$PY" pretrain_gpt_ltd.py \
  --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --max-position-embeddings 256 \
  --micro-batch-size 8 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS" --weight-decay 0.1 \
  --adam-beta2 0.95 --clip-grad 1.0 --hidden-dropout 0.0 --attention-dropout 0.0 \
  --random-ltd --random-ltd-start-seq-length 128 --random-ltd-seq-step 16 \
  --random-ltd-ramp-fraction 0.7 \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" \
  --merge-file "$OUT/tokenizer/merges.txt" --data-path "$OUT/data/corpus_text_document" --split "$SPLIT" \
  --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --num-workers 0 --seed 1234 \
  --save "$OUT/checkpoints" --save-interval "$SAVE_INTERVAL" --log-json "$OUT/metrics.jsonl" \
  --tensorboard-dir "$OUT/tensorboard" ${EXTRA_ARGS:-} 2>&1 | tee "$OUT/train.log"

echo
echo "done."
echo "  training log:                                   $OUT/train.log"
echo "  metrics (one JSON object per logged iteration): $OUT/metrics.jsonl"
echo "  tensorboard logs:                               $OUT/tensorboard  (tensorboard --logdir $OUT/tensorboard)"
echo "  checkpoint:                                     $OUT/checkpoints (latest: $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))"
echo "  to train on: rerun the step-4 command with --load $OUT/checkpoints and a larger --train-iters"
