"""Rebuild a trained GPT from its checkpoint folder, in one process, for evaluation and export.

    gpt = load_gpt_checkpoint("runs/gpt/checkpoints")  # latest iteration; or ".../iter_0000100"
    gpt.model(tokens)                                   # [b, s] -> logits [b, s, V] (V = padded vocab)
    gpt.tokenizer.tokenize("Hello")                      # the tokenizer the model was trained with

Everything comes from the checkpoint itself: the model shape from its saved flags (`args`), the
tokenizer from its tokenizer flags (files are looked up where training found them, or where the caller
says with `tokenizer_overrides`). The model is put in eval mode, so random-LTD and dropout are off and
every layer sees the full sequence.

A checkpoint saved with tensor or pipeline parallelism (`mp_rank_01/`, `mp_rank_00_001/`, ...) is merged
in memory (`megatron.training.checkpoint_layout.load_merged_checkpoint`, the logic behind
`tools/checkpoint_util.py --merge`) into the single-process model.
"""

import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.core.errors import UserError
from megatron.core.models.gpt import GPTModel
from megatron.core.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer, vocab_size_with_padding
from megatron.core.transformer.config import TransformerConfig
from megatron.training.checkpoint_layout import load_merged_checkpoint
from megatron.training.checkpointing import checkpoint_dir, load_checkpoint, read_tracker

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
ITER_DIR = re.compile(r"^iter_(\d{7})$")
TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")


@dataclass
class LoadedGPT:
    model: GPTModel  # eval mode, on the requested device and dtype
    tokenizer: Tokenizer
    config: TransformerConfig
    args: dict  # the training flags saved in the checkpoint
    iteration: int
    path: str  # the checkpoint folder (the one holding latest_checkpointed_iteration.txt)


def resolve_checkpoint(load: str, iteration: Optional[int] = None):
    """(root, iteration) for `--load`, which may name the checkpoint root or one `iter_XXXXXXX` folder."""
    load = os.path.abspath(os.path.expanduser(load))
    if not os.path.isdir(load):
        raise UserError(f"--load {load}: no such folder; pass a checkpoint folder written with --save")
    m = ITER_DIR.match(os.path.basename(load))
    if m and iteration is None:
        return os.path.dirname(load), int(m.group(1))
    if iteration is None:
        iteration = read_tracker(load)
    if iteration is None:
        raise UserError(f"--load {load} holds no checkpoint (no latest_checkpointed_iteration.txt); "
                        f"pass the folder given to --save, or one iter_XXXXXXX folder in it")
    return load, iteration


def is_single_file_layout(root: str, iteration: int) -> bool:
    """True for `iter_XXXXXXX/mp_rank_00/`; False for a tensor/pipeline-parallel checkpoint."""
    folder = checkpoint_dir(root, iteration)
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {folder} is missing; --load {root} has no iteration {iteration}")
    ranks = sorted(d for d in os.listdir(folder) if RANK_DIR.match(d))
    return not ranks or ranks == ["mp_rank_00"]


def require_gpt(args: dict) -> None:
    """Evaluation and export read GPT checkpoints; a BERT one gets a line saying how BERTs are judged."""
    if args.get("model_type") == "bert":
        raise UserError("this is a BERT checkpoint (pretrain_bert_ltd.py); zero-shot evaluation and the HF export "
                        "take GPT checkpoints; judge a BERT by fine-tuning it with tasks/finetune_pair.py")


def config_from_args(args: dict) -> TransformerConfig:
    """The model's TransformerConfig from the saved flags (the same mapping as pretrain_gpt_ltd.py)."""
    try:
        return TransformerConfig(
            num_layers=args["num_layers"], hidden_size=args["hidden_size"],
            num_attention_heads=args["num_attention_heads"], seq_length=args["seq_length"],
            vocab_size=args["padded_vocab_size"], max_position_embeddings=args.get("max_position_embeddings"),
            ffn_hidden_size=args.get("ffn_hidden_size"),
            position_embedding_type=args.get("position_embedding_type", "learned_absolute"),
            rotary_base=args.get("rotary_base", 10000), normalization=args.get("normalization", "LayerNorm"),
            layernorm_epsilon=args.get("norm_epsilon", 1e-5), swiglu=args.get("swiglu", False),
            add_bias_linear=not args.get("disable_bias_linear", False), hidden_dropout=0.0, attention_dropout=0.0,
            init_method_std=args.get("init_method_std", 0.02),
            untie_embeddings_and_output_weights=args.get("untie_embeddings_and_output_weights", False),
        )
    except KeyError as e:
        raise UserError(f"checkpoint args lack {e.args[0]!r}; this is not a GPT checkpoint of this project")


def _find_file(path: Optional[str], root: str) -> Optional[str]:
    """A tokenizer file as training saw it: as given, or relative to the checkpoint's parent folders."""
    if path is None or os.path.exists(path):
        return path
    if not os.path.isabs(path):
        for base in (root, os.path.dirname(root)):
            if os.path.exists(os.path.join(base, path)):
                return os.path.join(base, path)
    return path  # build_tokenizer names the missing file and its flag


def tokenizer_from_args(args: dict, root: str, overrides: Optional[dict] = None) -> Tokenizer:
    """The training tokenizer; `overrides` ({"vocab_file": ...}) replace flags whose files have moved."""
    flags = {k: args.get(k) for k in TOKENIZER_FLAGS}
    flags.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if flags["tokenizer_type"] is None:
        raise UserError("checkpoint args name no --tokenizer-type; pass --tokenizer-type and its files")
    for k in ("vocab_file", "merge_file", "tokenizer_model"):
        flags[k] = _find_file(flags[k], root)
    try:
        return build_tokenizer(TokenizerConfig(**flags))
    except UserError as e:
        raise UserError(f"cannot rebuild the checkpoint's tokenizer: {e} (the file may have moved: pass "
                        f"--vocab-file/--merge-file/--tokenizer-model to point at it)")


def load_gpt_checkpoint(load: str, iteration: Optional[int] = None, device="cpu", dtype=torch.float32,
                        tokenizer_overrides: Optional[dict] = None) -> LoadedGPT:
    """Model (eval mode), tokenizer and config of a GPT checkpoint in any training layout."""
    root, iteration = resolve_checkpoint(load, iteration)
    if is_single_file_layout(root, iteration):
        ckpt = load_checkpoint(root, iteration)
    else:
        ckpt = load_merged_checkpoint(root, iteration)
    args = dict(ckpt.get("args") or {})
    require_gpt(args)
    tokenizer = tokenizer_from_args(args, root, tokenizer_overrides)
    if "padded_vocab_size" not in args:  # older checkpoints: recompute as the trainer did
        args["padded_vocab_size"] = vocab_size_with_padding(
            tokenizer.vocab_size, args.get("make_vocab_size_divisible_by", 128),
            args.get("tensor_model_parallel_size", 1))
    config = config_from_args(args)
    state = dict(ckpt["model"])
    if not config.untie_embeddings_and_output_weights:
        state.pop("output_layer.weight", None)  # the last pipeline stage's copy of the tied embedding
    model = GPTModel(config)
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
