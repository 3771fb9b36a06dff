"""Tokenizers: Megatron's flags -> `TokenizerConfig` -> `build_tokenizer` -> a `Tokenizer`.

- `GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt`: EOD `<|endoftext|>`.
- `SentencePieceTokenizer --tokenizer-model tokenizer.model`: EOD the model's eos id.
- `HuggingFaceTokenizer --tokenizer-model tokenizer.json` (or its folder): EOD `<|endoftext|>`, `</s>`, ...
- `NullTokenizer --vocab-size N`: ids as text; EOD `N`, vocab_size `N + 1`.
- `BertWordPieceLowerCase` / `BertWordPieceCase --vocab-file vocab.txt`: BERT's WordPiece; `cls`, `sep`,
  `mask`, `pad`, `inv_vocab`; EOD `[EOS]` (appended to the vocab with `[BOS]` when missing, as Megatron).

See docs/tokenizers.md. The argparse helpers live here rather than in `megatron.training` because
`tools/preprocess_data.py` needs the same flags without the trainer.
"""

import argparse

from megatron.core.errors import UserError
from megatron.core.tokenizer.base import TOKENIZER_TYPES, Tokenizer, TokenizerConfig

__all__ = [
    "TOKENIZER_TYPES",
    "Tokenizer",
    "TokenizerConfig",
    "add_tokenizer_args",
    "build_tokenizer",
    "tokenizer_config_from_args",
    "vocab_size_with_padding",
]


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """The tokenizer `config` names; a missing or unreadable file raises a UserError naming its flag."""
    # Imported here so that a type's library (sentencepiece, tokenizers) loads only when that type is used.
    t = config.tokenizer_type
    if t == "GPT2BPETokenizer":
        from megatron.core.tokenizer.gpt2_bpe import GPT2BPETokenizer
        return GPT2BPETokenizer(config.vocab_file, config.merge_file)
    if t == "SentencePieceTokenizer":
        from megatron.core.tokenizer.sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer(config.tokenizer_model)
    if t == "HuggingFaceTokenizer":
        from megatron.core.tokenizer.huggingface import HuggingFaceTokenizer
        return HuggingFaceTokenizer(config.tokenizer_model)
    if t == "NullTokenizer":
        from megatron.core.tokenizer.null import NullTokenizer
        return NullTokenizer(config.vocab_size)
    if t in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        from megatron.core.tokenizer.wordpiece import BertWordPieceTokenizer
        return BertWordPieceTokenizer(config.vocab_file, lower_case=t == "BertWordPieceLowerCase")
    raise AssertionError(f"TokenizerConfig let through unknown type {t!r}")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's tokenizer flags (same names and defaults as Megatron-LM's `_add_tokenizer_args`)."""
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", type=str, default=None, choices=TOKENIZER_TYPES,
                   help="Which tokenizer to use.")
    g.add_argument("--vocab-file", type=str, default=None,
                   help="GPT2BPETokenizer: path to vocab.json; BertWordPiece*: path to vocab.txt.")
    g.add_argument("--merge-file", type=str, default=None,
                   help="GPT2BPETokenizer: path to merges.txt.")
    g.add_argument("--tokenizer-model", type=str, default=None,
                   help="SentencePieceTokenizer: a .model file; HuggingFaceTokenizer: a tokenizer.json "
                        "or a folder holding one.")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: number of ordinary ids N; EOD is N.")
    return parser


def tokenizer_config_from_args(args: argparse.Namespace) -> TokenizerConfig:
    """`TokenizerConfig` from parsed flags; a missing `--tokenizer-type` or file flag is a UserError."""
    if getattr(args, "tokenizer_type", None) is None:
        raise UserError(f"--tokenizer-type is required: one of {', '.join(TOKENIZER_TYPES)}")
    return TokenizerConfig(
        tokenizer_type=args.tokenizer_type,
        vocab_file=getattr(args, "vocab_file", None),
        merge_file=getattr(args, "merge_file", None),
        tokenizer_model=getattr(args, "tokenizer_model", None),
        vocab_size=getattr(args, "vocab_size", None),
    )


def vocab_size_with_padding(orig_vocab_size: int, make_vocab_size_divisible_by: int,
                            tensor_model_parallel_size: int) -> int:
    """Round the vocab up to a multiple of `make_vocab_size_divisible_by * tensor_model_parallel_size`.

    Why: the embedding and output layer are split by rows across TP ranks, so each rank needs an equal
    share, and a multiple of 128 per rank keeps the matmul shapes fast. The padded rows are never targets.
    """
    assert orig_vocab_size >= 1, "a tokenizer has at least one id"
    if make_vocab_size_divisible_by < 1:
        raise UserError(f"--make-vocab-size-divisible-by must be >= 1, got {make_vocab_size_divisible_by}")
    if tensor_model_parallel_size < 1:
        raise UserError(f"--tensor-model-parallel-size must be >= 1, got {tensor_model_parallel_size}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple
