# Precision and optimizer sharding of the recipes (sourced by *_common.sh); sets PRECISION_ARGS and
# DIST_OPT_ARGS from two environment knobs, defaulting to what Megatron's GPT-3 examples use.
PRECISION=${PRECISION-bf16}                # bf16 (Megatron's GPT-3 examples) | fp16 (the paper's, dynamic loss
                                           # scale) | fp32 (also ""): bf16/fp16 parameters, fp32 main params and grads
DIST_OPT=${DIST_OPT-1}                     # 1: --use-distributed-optimizer (ZeRO-1, as the paper's DeepSpeed run)
                                           # with gradient reduce and parameter gather overlapped; 0: plain DDP
case "$PRECISION" in
  bf16) PRECISION_ARGS=--bf16 ;;
  fp16) PRECISION_ARGS=--fp16 ;;
  fp32 | "") PRECISION_ARGS= ;;
  --*) PRECISION_ARGS=$PRECISION ;;        # a flag string, as earlier versions of these recipes took
  *) echo "error: PRECISION must be bf16, fp16 or fp32, got '$PRECISION'" >&2; exit 2 ;;
esac
case "$DIST_OPT" in
  1) DIST_OPT_ARGS="--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather" ;;
  0 | "") DIST_OPT_ARGS= ;;
  *) echo "error: DIST_OPT must be 1 or 0, got '$DIST_OPT'" >&2; exit 2 ;;
esac
