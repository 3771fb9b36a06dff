#!/usr/bin/env bash
# CPU quickstart: sample corpus -> tokenizer -> Megatron-format data -> a small GPT with random-LTD.
# Offline, about 5 minutes on 2 cores. Everything lands in $OUT (default runs/quickstart).
# Knobs: OUT, TRAIN_ITERS (default 400), PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-400}
mkdir -p "$OUT/data" "$OUT/tokenizer"

echo "== 1/4 sample corpus (text that ships with Python)"
"$PY" tools/make_sample_corpus.py --output "$OUT/data/corpus.jsonl"

echo "== 2/4 tokenizer (GPT-2 style byte-level BPE, 8k)"
"$PY" tools/train_tokenizer.py --input "$OUT/data/corpus.jsonl" --type gpt2-bpe --vocab-size 8192 \
  --output-dir "$OUT/tokenizer"

echo "== 3/4 preprocess into Megatron's .bin/.idx"
"$PY" tools/preprocess_data.py --input "$OUT/data/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" \
  --merge-file "$OUT/tokenizer/merges.txt" --append-eod --workers 2 --log-interval 1000

echo "== 4/4 train a 4-layer GPT with random-LTD on CPU"
rm -f "$OUT/metrics.jsonl"
"$PY" pretrain_gpt_ltd.py \
  --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --max-position-embeddings 256 \
  --micro-batch-size 8 --global-batch-size 8 --train-iters "$TRAIN_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 40 --weight-decay 0.1 \
  --adam-beta2 0.95 --clip-grad 1.0 --hidden-dropout 0.0 --attention-dropout 0.0 \
  --random-ltd --random-ltd-start-seq-length 128 --random-ltd-seq-step 16 \
  --random-ltd-ramp-fraction 0.7 \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" \
  --merge-file "$OUT/tokenizer/merges.txt" --data-path "$OUT/data/corpus_text_document" --split 949,50,1 \
  --log-interval 20 --eval-interval 50 --eval-iters 10 --num-workers 0 --seed 1234 \
  --save "$OUT/checkpoints" --save-interval 200 --log-json "$OUT/metrics.jsonl" \
  --tensorboard-dir "$OUT/tensorboard"

echo
echo "done."
echo "  metrics (one JSON object per logged iteration): $OUT/metrics.jsonl"
echo "  tensorboard logs:                               $OUT/tensorboard  (tensorboard --logdir $OUT/tensorboard)"
echo "  checkpoint:                                     $OUT/checkpoints (latest: $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))"
echo "  to train on: rerun the step-4 command with --load $OUT/checkpoints and a larger --train-iters"
