#!/usr/bin/env bash
# Zero-shot evaluation of a GPT checkpoint on the random-LTD paper's 19 GPT-3 tasks (Table I.1), with
# lm-evaluation-harness 0.4 task names:
#   bash examples/evaluate_zeroshot_gpt.sh CHECKPOINT_DIR [RESULTS_JSON]
# Knobs (environment): NPROC data-parallel ranks through torchrun (default 1), BATCH_SIZE (default 16),
# LIMIT documents per task (default: all), TASKS_DIR override task files written by
# tools/make_local_tasks.py for a machine without internet, PYTHON (default: python).
# The paper reports acc_norm for hellaswag, piqa, arc_*, openbookqa; f1 for record; acc elsewhere
# (exact match for triviaqa and webqs). Its numbers came from lm-eval 0.2, whose prompts differ in places.
set -euo pipefail
# Paths are the caller's: made absolute here, before the cd to the repository root.
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
CKPT=$(abs "${1:?usage: bash examples/evaluate_zeroshot_gpt.sh CHECKPOINT_DIR [RESULTS_JSON]}")
OUT=$(abs "${2:-$CKPT/zeroshot_results.json}")
[ -n "${TASKS_DIR:-}" ] && TASKS_DIR=$(abs "$TASKS_DIR")
PY=${PYTHON:-python}
case "$PY" in */*) PY=$(abs "$PY") ;; esac  # a relative interpreter path too; a bare name stays on PATH
cd "$(dirname "$0")/.."

TASKS=(
  hellaswag lambada_openai triviaqa webqs winogrande piqa arc_challenge arc_easy
  anli_r1 anli_r2 anli_r3 openbookqa race boolq copa sglue_rte wsc multirc record
)
ARGS=(--load "$CKPT" --tasks "$(IFS=,; echo "${TASKS[*]}")" --num-fewshot 0
      --batch-size "${BATCH_SIZE:-16}" --output-path "$OUT")
[ -n "${TASKS_DIR:-}" ] && ARGS+=(--include-path "$TASKS_DIR")
[ -n "${LIMIT:-}" ] && ARGS+=(--limit "$LIMIT")

if [ "${NPROC:-1}" -gt 1 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" tools/evaluate_zeroshot.py "${ARGS[@]}"
else
  "$PY" tools/evaluate_zeroshot.py "${ARGS[@]}"
fi
