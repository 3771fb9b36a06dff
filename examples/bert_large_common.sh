# Shared settings of the BERT-large recipes (sourced by pretrain_bert_large_{ltd,baseline}.sh): Yao et al.
# 2022, Table 2, after Megatron-DeepSpeed's ds_pretrain_bert_336M scripts. Every value can be overridden
# from the environment, so the same scripts run a tiny model on a laptop and the real one on a cluster.

# --- cluster ---------------------------------------------------------------------------------------
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}                                # --tensor-model-parallel-size
PP=${PP:-1}                                # --pipeline-model-parallel-size
PYTHON=${PYTHON:-python}

# --- data and tokenizer (BERT-large-uncased WordPiece; data from preprocess_data.py --split-sentences) -----
DATA_PATH=${DATA_PATH:-data/pile_bert_text_sentence}
VOCAB_FILE=${VOCAB_FILE:-data/bert-large-uncased-vocab.txt}
TOKENIZER_ARGS=${TOKENIZER_ARGS:---tokenizer-type BertWordPieceLowerCase --vocab-file $VOCAB_FILE}

# --- model: BERT-large, 336M (24 layers, hidden 1024, 16 heads, sequence 512) ----------------------------
NUM_LAYERS=${NUM_LAYERS:-24}
HIDDEN=${HIDDEN:-1024}
HEADS=${HEADS:-16}
SEQ=${SEQ:-512}
INIT_STD=${INIT_STD:-0.02}

# --- batch, optimizer, length ------------------------------------------------------------------------
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
MICRO_BATCH=${MICRO_BATCH:-16}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-10000}
TRAIN_ITERS=${TRAIN_ITERS:-2000000}        # 2M x 1024 x 512 = 1049B tokens read
source "$(dirname "${BASH_SOURCE[0]}")/precision.sh"  # PRECISION=bf16|fp16|fp32, DIST_OPT=1|0

# --- output ------------------------------------------------------------------------------------------
RUN_NAME=${RUN_NAME:-bert_large}
OUT=${OUT:-runs/$RUN_NAME}
SAVE_INTERVAL=${SAVE_INTERVAL:-10000}
LOG_INTERVAL=${LOG_INTERVAL:-100}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-10}
EXTRA_ARGS=${EXTRA_ARGS:-}

LAUNCH=${LAUNCH:-torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $GPUS_PER_NODE \
  --master_addr $MASTER_ADDR --master_port $MASTER_PORT}

COMMON_ARGS="--num-layers $NUM_LAYERS --hidden-size $HIDDEN --num-attention-heads $HEADS \
  --seq-length $SEQ --max-position-embeddings $SEQ --init-method-std $INIT_STD \
  --hidden-dropout 0.1 --attention-dropout 0.1 \
  --tensor-model-parallel-size $TP --pipeline-model-parallel-size $PP \
  --micro-batch-size $MICRO_BATCH --global-batch-size $GLOBAL_BATCH --train-iters $TRAIN_ITERS \
  --lr $LR --min-lr $MIN_LR --lr-decay-style linear --lr-warmup-iters $WARMUP_ITERS \
  --adam-beta1 0.9 --adam-beta2 0.999 --weight-decay 1e-2 --clip-grad 1.0 $PRECISION_ARGS $DIST_OPT_ARGS \
  $TOKENIZER_ARGS --data-path $DATA_PATH --split 949,50,1 --seed 1234 \
  --log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
  --save $OUT/checkpoints --load $OUT/checkpoints --save-interval $SAVE_INTERVAL \
  --log-json $OUT/metrics.jsonl --tensorboard-dir $OUT/tensorboard"
