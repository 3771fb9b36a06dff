# Shared settings of the GPT-3 1.3B recipes (sourced by pretrain_gpt_1.3b_{ltd,baseline}.sh).
# Every value can be overridden from the environment, so the same scripts run a tiny model on a laptop
# (see tests/functional/test_recipes.py) and the real one on a cluster.

# --- cluster ---------------------------------------------------------------------------------------
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}                                # --tensor-model-parallel-size
PP=${PP:-1}                                # --pipeline-model-parallel-size

# --- data and tokenizer (GPT-2 BPE, as in the paper) -------------------------------------------------
DATA_PATH=${DATA_PATH:-data/pile_text_document}   # a prefix, or a blend "0.5 a_text_document 0.5 b_text_document"
VOCAB_FILE=${VOCAB_FILE:-data/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-data/gpt2-merges.txt}
TOKENIZER_ARGS=${TOKENIZER_ARGS:---tokenizer-type GPT2BPETokenizer --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE}

# --- model: GPT-3 1.3B (24 layers, hidden 2048, 16 heads, sequence 2048) ------------------------------
NUM_LAYERS=${NUM_LAYERS:-24}
HIDDEN=${HIDDEN:-2048}
HEADS=${HEADS:-16}
SEQ=${SEQ:-2048}
INIT_STD=${INIT_STD:-0.013}

# --- batch and optimizer ------------------------------------------------------------------------------
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
MICRO_BATCH=${MICRO_BATCH:-4}
LR=${LR:-2e-4}
MIN_LR=${MIN_LR:-1e-6}
WARMUP_TOKENS=${WARMUP_TOKENS:-3e9}
source "$(dirname "${BASH_SOURCE[0]}")/precision.sh"  # PRECISION=bf16|fp16|fp32, DIST_OPT=1|0

# --- output ------------------------------------------------------------------------------------------
RUN_NAME=${RUN_NAME:-gpt_1.3b}
OUT=${OUT:-runs/$RUN_NAME}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
EVAL_ITERS=${EVAL_ITERS:-10}
EXTRA_ARGS=${EXTRA_ARGS:-}

LAUNCH=${LAUNCH:-torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $GPUS_PER_NODE \
  --master_addr $MASTER_ADDR --master_port $MASTER_PORT}   # LAUNCH=echo prints the command instead

COMMON_ARGS="--num-layers $NUM_LAYERS --hidden-size $HIDDEN --num-attention-heads $HEADS \
  --seq-length $SEQ --max-position-embeddings $SEQ --init-method-std $INIT_STD \
  --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP \
  --micro-batch-size $MICRO_BATCH --global-batch-size $GLOBAL_BATCH \
  --lr $LR --min-lr $MIN_LR --lr-decay-style cosine --lr-warmup-tokens $WARMUP_TOKENS \
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 $PRECISION_ARGS $DIST_OPT_ARGS \
  $TOKENIZER_ARGS --data-path $DATA_PATH --split 949,50,1 --seed 1234 \
  --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --save $OUT/checkpoints --load $OUT/checkpoints --save-interval $SAVE_INTERVAL \
  --log-json $OUT/metrics.jsonl --tensorboard-dir $OUT/tensorboard"
