#!/usr/bin/env bash
# Fine-tune a GPT checkpoint with random-LTD on a local text corpus, with the paper's GPT-2 fine-tuning
# settings (Yao et al. 2022, §5.4: GPT-2 medium on PTB / WikiText): sequence 1024, global batch 32, LR 5e-5,
# dropout 0.1, every layer but the first and last drops tokens, and the kept length grows linearly (MSLG)
# from r_0 = 128 to the full 1024 at 80 % of the iterations. docs/finetuning.md explains each choice.
#
#   1. TRAIN_DATA (and VALID_DATA): .txt or .jsonl -> tools/preprocess_data.py with the model's tokenizer
#   2. pretrain_gpt_ltd.py --load $LOAD --finetune: the weights only; iteration count, optimizer, LR
#      schedule, random-LTD schedule and data position all start afresh
#   3. the final validation perplexity (the trainer's `lm loss PPL`), printed last
#
#   LOAD=runs/gpt2-medium TRAIN_DATA=ptb.train.txt VALID_DATA=ptb.valid.txt bash examples/finetune_gpt2_ltd.sh
#
# LOAD is a checkpoint folder of this project (written with --save, or by tools/convert_hf_to_checkpoint.py
# or tools/checkpoint_util.py) or of Megatron-LM. The model flags, the tensor/pipeline layout and the
# tokenizer are read from it; every value below can be overridden from the environment, so the same script
# fine-tunes a tiny model on a laptop (tests/functional/test_finetune_ltd.py) and GPT-2 medium on a GPU.
# Rerunning with the same OUT resumes an interrupted fine-tuning from $OUT/checkpoints.
set -euo pipefail
# Paths are the caller's: made absolute here, before the cd to the repository root.
abs() { case "$1" in /* | "") printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
PY=${PYTHON:-python}
case "$PY" in */*) PY=$(abs "$PY") ;; esac  # a relative interpreter path too; a bare name stays on PATH

# --- input ---------------------------------------------------------------------------------------------
LOAD=$(abs "${LOAD:?set LOAD to the checkpoint folder (the one holding latest_checkpointed_iteration.txt)}")
TRAIN_DATA=$(abs "${TRAIN_DATA:?set TRAIN_DATA to a .txt or .jsonl file}")
VALID_DATA=$(abs "${VALID_DATA:-}")        # held-out file (PTB/WikiText valid); empty: SPLIT cuts it from TRAIN_DATA
OUT=$(abs "${OUT:-}")                      # default (below): runs/finetune_gpt2_ltd in the repository
cd "$(dirname "$0")/.."
SPLIT=${SPLIT:-949,50,1}                   # train,valid,test document weights, only without VALID_DATA
JSON_KEY=${JSON_KEY:-text}                 # .jsonl: the key holding each document's text
DOC_LINES=${DOC_LINES:-100}                # .txt: every DOC_LINES lines (newlines kept) are one document
WORKERS=${WORKERS:-4}                      # tokenizer processes

# --- model and tokenizer: the checkpoint's own (set TOKENIZER_ARGS if its tokenizer files moved) ---------
# MODEL_ARGS, TOKENIZER_ARGS and EXTRA_ARGS are passed as they are: paths in them are relative to the repository.
CKPT=$("$PY" -m megatron.checkpoint.saved_flags "$LOAD")  # CKPT_ROOT, _ITERATION, _TP, _PP, _MODEL_TYPE, ...
eval "$CKPT"
if [ "$CKPT_MODEL_TYPE" = bert ]; then
  echo "error: $LOAD holds a BERT model; fine-tune it with tasks/finetune_pair.py (docs/bert.md)" >&2
  exit 2
fi
MODEL_ARGS=${MODEL_ARGS:-$CKPT_MODEL_ARGS}
TOKENIZER_ARGS=${TOKENIZER_ARGS:-$CKPT_TOKENIZER_ARGS}  # e.g. --tokenizer-type GPT2BPETokenizer --vocab-file ...
if [ -z "$TOKENIZER_ARGS" ]; then
  echo "error: $LOAD records no tokenizer; set TOKENIZER_ARGS (e.g. '--tokenizer-type GPT2BPETokenizer" \
       "--vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt')" >&2
  exit 2
fi
TP=${TP:-$CKPT_TP}                         # the checkpoint's layout (tools/checkpoint_util.py converts it);
PP=${PP:-$CKPT_PP}                         # GPUS_PER_NODE must be a multiple of TP x PP
DROPOUT=${DROPOUT:-0.1}                    # hidden and attention dropout (the paper's best PTB runs use 0.1)

# --- fine-tuning: the paper's GPT-2 settings ------------------------------------------------------------
SEQ=${SEQ:-1024}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
MICRO_BATCH=${MICRO_BATCH:-4}
LR=${LR:-5e-5}
MIN_LR=${MIN_LR:-0}
LR_DECAY_STYLE=${LR_DECAY_STYLE:-linear}   # not given in the paper: linear decay after 10 % warmup
WARMUP_FRACTION=${WARMUP_FRACTION:-0.1}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.01}
EPOCHS=${EPOCHS:-3}                        # not given in the paper; TRAIN_ITERS (if set) wins
LTD_START=${LTD_START:-128}                # r_0; the paper also uses 64 for WikiText
LTD_STEP=${LTD_STEP:-16}
LTD_RAMP_FRACTION=${LTD_RAMP_FRACTION:-0.8}  # r reaches SEQ at 80 % of the iterations (70 % for WikiText)
LTD_LAYERS=${LTD_LAYERS:-}                 # empty: all but the first and last layer (the paper's best, Table 5)
SEED=${SEED:-1234}
source examples/precision.sh               # PRECISION=bf16|fp16|fp32, DIST_OPT=1|0

# --- output and launch ----------------------------------------------------------------------------------
OUT=${OUT:-runs/finetune_gpt2_ltd}
LOG_INTERVAL=${LOG_INTERVAL:-10}
SAVE_INTERVAL=${SAVE_INTERVAL:-}           # empty: save at the end only
EXTRA_ARGS=${EXTRA_ARGS:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}          # the paper fine-tuned on one V100
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
LAUNCH=${LAUNCH:-torchrun --nproc_per_node $GPUS_PER_NODE --master_addr $MASTER_ADDR --master_port $MASTER_PORT}
mkdir -p "$OUT/data"

echo "== 1/3 tokenize $TRAIN_DATA${VALID_DATA:+ and $VALID_DATA} ($TOKENIZER_ARGS)"
DATA=$OUT/data/corpus_text_document
INPUTS="$TRAIN_DATA|$VALID_DATA|$JSON_KEY|$DOC_LINES|$TOKENIZER_ARGS"
if [ -f "$DATA.idx" ] && [ "$(cat "$OUT/data/inputs.txt" 2>/dev/null)" = "$INPUTS" ]; then
  echo "   $DATA is up to date (remove $OUT/data to tokenize again)"
else
  rm -rf "$OUT/data/parts" "$OUT/data/cache" "$OUT/data/inputs.txt" "$DATA.bin" "$DATA.idx"
  mkdir -p "$OUT/data/parts"
  tokenize() {  # tokenize FILE PREFIX: a .txt is cut into documents of DOC_LINES lines first
    local input=$1
    case "$1" in
      *.jsonl | *.json) ;;
      *) input=$OUT/data/parts/$(basename "$2").jsonl
         "$PY" -c 'import itertools, json, sys
src, dst, key, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
    while lines := list(itertools.islice(f, n)):
        out.write(json.dumps({key: "".join(lines)}) + "\n")' "$1" "$input" "$JSON_KEY" "$DOC_LINES" ;;
    esac
    # shellcheck disable=SC2086  # word splitting of TOKENIZER_ARGS is intended
    "$PY" tools/preprocess_data.py --input "$input" --json-keys "$JSON_KEY" --output-prefix "$2" \
      $TOKENIZER_ARGS --append-eod --workers "$WORKERS" --log-interval 100000 --no-progress-bar
  }
  if [ -n "$VALID_DATA" ]; then  # train documents, then valid ones: one corpus that --split cuts exactly
    tokenize "$TRAIN_DATA" "$OUT/data/parts/1_train"
    tokenize "$VALID_DATA" "$OUT/data/parts/2_valid"
    rm -f "$OUT/data/parts/"*.jsonl
    "$PY" tools/merge_datasets.py --input "$OUT/data/parts" --output-prefix "$DATA"
  else
    tokenize "$TRAIN_DATA" "$OUT/data/corpus"
    rm -f "$OUT/data/parts/"*.jsonl
    [ "$JSON_KEY" = text ] || { mv "$OUT/data/corpus_${JSON_KEY}_document.bin" "$DATA.bin"; \
                                mv "$OUT/data/corpus_${JSON_KEY}_document.idx" "$DATA.idx"; }
  fi
  echo "$INPUTS" > "$OUT/data/inputs.txt"
fi

# The run's length in epochs of the train split, and a validation that reads the whole valid split once.
PLAN=$("$PY" - "$DATA" "$OUT/data/parts" "${VALID_DATA:+held-out}" "$SPLIT" "$SEQ" "$GLOBAL_BATCH" "$EPOCHS" <<'EOF'
import glob
import math
import sys

from megatron.core.datasets.common import parse_split, split_matrix, split_range
from megatron.core.datasets.indexed import IndexedDataset

data, parts, held_out, split, s, G, epochs = sys.argv[1:]
s, G, epochs = int(s), int(G), float(epochs)
if held_out:  # the corpus is train's sequences then valid's: cut it there
    n_train, n_valid = (len(IndexedDataset(p[:-4])) for p in sorted(glob.glob(f"{parts}/*.idx")))
    split = f"{n_train},{n_valid},0"
lengths = IndexedDataset(data).sequence_lengths
ranges = [split_range(b, len(lengths)) if b else (0, 0) for b in split_matrix(parse_split(split))]
train, valid = ((int(lengths[a:b].sum()) - 1) // s for a, b in ranges[:2])  # samples per epoch
print(f"DATA_SPLIT={split} TRAIN_SAMPLES={train} VALID_SAMPLES={valid}")
print(f"EPOCH_ITERS={max(1, math.ceil(train / G))} EPOCHS_ITERS={max(1, math.ceil(epochs * train / G))}")
print(f"VALID_ITERS={max(1, valid // G)}")
EOF
)
eval "$PLAN"
TRAIN_ITERS=${TRAIN_ITERS:-$EPOCHS_ITERS}
EVAL_ITERS=${EVAL_ITERS:-$VALID_ITERS}     # global batches per validation (default: the valid split once)
EVAL_INTERVAL=${EVAL_INTERVAL:-$EPOCH_ITERS}  # default: after every epoch, and at the end
echo "   train split: $TRAIN_SAMPLES samples of $SEQ tokens, valid split: $VALID_SAMPLES (--split $DATA_SPLIT)"

if [ -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ]; then
  echo "== 2/3 resume the fine-tuning in $OUT/checkpoints"
  LOAD_ARGS="--load $OUT/checkpoints"
else
  echo "== 2/3 fine-tune $CKPT_ROOT (iteration $CKPT_ITERATION) for $TRAIN_ITERS iterations"
  LOAD_ARGS="--load $CKPT_ROOT --finetune"
  rm -rf "$OUT/metrics.jsonl" "$OUT/train.log" "$OUT/tensorboard"  # a new fine-tuning starts fresh logs
fi
# shellcheck disable=SC2086  # word splitting of the argument strings is intended
$LAUNCH pretrain_gpt_ltd.py $MODEL_ARGS $TOKENIZER_ARGS \
  --seq-length "$SEQ" --hidden-dropout "$DROPOUT" --attention-dropout "$DROPOUT" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style "$LR_DECAY_STYLE" --lr-warmup-fraction "$WARMUP_FRACTION" \
  --weight-decay "$WEIGHT_DECAY" --clip-grad 1.0 $PRECISION_ARGS $DIST_OPT_ARGS \
  --random-ltd --random-ltd-start-seq-length "$LTD_START" --random-ltd-seq-step "$LTD_STEP" \
  --random-ltd-ramp-fraction "$LTD_RAMP_FRACTION" ${LTD_LAYERS:+--random-ltd-layers "$LTD_LAYERS"} \
  --data-path "$DATA" --split "$DATA_SPLIT" --seed "$SEED" \
  --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" \
  $LOAD_ARGS --save "$OUT/checkpoints" ${SAVE_INTERVAL:+--save-interval "$SAVE_INTERVAL"} \
  --log-json "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" $EXTRA_ARGS 2>&1 | tee -a "$OUT/train.log"

echo "== 3/3 result"
"$PY" - "$OUT/metrics.jsonl" "$OUT/checkpoints" <<'EOF'
import json
import sys

vals = [r for r in map(json.loads, open(sys.argv[1])) if "val_ppl" in r]
if not vals:
    sys.exit("error: no validation was run (EVAL_ITERS=0?)")
best, last = min(vals, key=lambda r: r["val_loss"]), vals[-1]
print(f"  best validation perplexity:  {best['val_ppl']:.3f} at iteration {best['iteration']}")
print(f"  fine-tuned checkpoint:       {sys.argv[2]}")
print(f"final validation perplexity: {last['val_ppl']:.3f} "
      f"(lm loss {last['val_loss']:.4f}, iteration {last['iteration']})")
EOF
