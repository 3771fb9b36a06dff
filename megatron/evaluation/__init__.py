"""Evaluating and exporting trained GPT checkpoints.

- `checkpoint_model`: checkpoint folder -> (model in eval mode, tokenizer, config), one process.
- `lm_eval_adapter`: the model as an lm-evaluation-harness 0.4 `TemplateLM` (`megatron-gpt`).
- `hf_export`: the model and tokenizer as a Hugging Face `transformers` folder (GPT-2 or Llama).
- `hf_tokenizer`: our tokenizer as a `tokenizer.json` that encodes exactly as ours (used by `hf_export`).

lm-eval and transformers are the optional `eval` extra (`pip install -e ".[eval]"`), so the modules
that need them are not imported here: import them where they are used.
"""
