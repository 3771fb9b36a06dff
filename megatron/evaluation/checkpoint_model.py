"""Rebuild a trained GPT from its checkpoint folder, in one process, for evaluation and export.

    gpt = load_gpt_checkpoint("runs/gpt/checkpoints")  # latest iteration; or ".../iter_0000100"
    gpt.model(tokens)                                   # [b, s] -> logits [b, s, V] (V = padded vocab)
    gpt.tokenizer.tokenize("Hello")                      # the tokenizer the model was trained with

Everything comes from the checkpoint itself: the model shape from its saved flags (`args`), the
tokenizer from its tokenizer flags (files are looked up where training found them, or where the caller
says with `tokenizer_overrides`). The model is put in eval mode, so random-LTD and dropout are off and
every layer sees the full sequence.

A checkpoint saved with tensor or pipeline parallelism (`mp_rank_01/`, `mp_rank_00_001/`, ...) is merged
in memory into the single-process model (`megatron.checkpoint.reader.load_unsharded_checkpoint`, the
logic behind `tools/checkpoint_util.py --merge`).
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.checkpoint.model_args import build_model_from_args
from megatron.checkpoint.reader import load_unsharded_checkpoint
from megatron.checkpoint.tokenizer import tokenizer_from_args
from megatron.core.errors import UserError
from megatron.core.models.gpt import GPTModel
from megatron.core.tokenizer import Tokenizer, vocab_size_with_padding
from megatron.core.transformer.config import TransformerConfig


@dataclass
class LoadedGPT:
    model: GPTModel  # eval mode, on the requested device and dtype
    tokenizer: Tokenizer
    config: TransformerConfig
    args: dict  # the training flags saved in the checkpoint
    iteration: int
    path: str  # the checkpoint folder (the one holding latest_checkpointed_iteration.txt)


def require_gpt(args: dict) -> None:
    """Evaluation and export read GPT checkpoints; a BERT one gets a line saying how BERTs are judged."""
    if args.get("model_type") == "bert":
        raise UserError("this is a BERT checkpoint (pretrain_bert_ltd.py); zero-shot evaluation and the HF export "
                        "take GPT checkpoints; judge a BERT by fine-tuning it with tasks/finetune_pair.py")


def load_gpt_checkpoint(load: str, iteration: Optional[int] = None, device="cpu", dtype=torch.float32,
                        tokenizer_overrides: Optional[dict] = None) -> LoadedGPT:
    """Model (eval mode), tokenizer and config of a GPT checkpoint in any training layout."""
    root, iteration, args, state = load_unsharded_checkpoint(load, iteration)
    require_gpt(args)
    tokenizer = tokenizer_from_args(args, root, tokenizer_overrides)
    if "padded_vocab_size" not in args:  # older checkpoints: recompute as the trainer did
        args["padded_vocab_size"] = vocab_size_with_padding(
            tokenizer.vocab_size, args.get("make_vocab_size_divisible_by", 128),
            args.get("tensor_model_parallel_size", 1))
    model = build_model_from_args(args, hidden_dropout=0.0, attention_dropout=0.0)
    config = model.config
    if not config.untie_embeddings_and_output_weights:
        state.pop("output_layer.weight", None)  # the last pipeline stage's copy of the tied embedding
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise UserError(f"checkpoint {root} iteration {iteration} does not fit its own args: "
                        f"{str(e).splitlines()[-1].strip()[:200]}")
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"checkpoint {root} iteration {iteration} does not fit its own args: missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.to(device=device, dtype=dtype).eval()
    return LoadedGPT(model, tokenizer, config, args, iteration, root)
