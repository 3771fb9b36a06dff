"""The training tokenizer, rebuilt from a checkpoint's saved tokenizer flags.

    ckpt["args"] = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "data/vocab.json",
                    "merge_file": "data/merges.txt", "tokenizer_model": None, "vocab_size": None,
                    "true_vocab_size": 50257, ...}

The trainer saves the tokenizer's size before padding as `true_vocab_size`; older checkpoints only have
the flags, whose files may have moved since.
"""

import os
from typing import Optional

from megatron.core.errors import UserError
from megatron.core.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer

TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")


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
    """The training tokenizer; `overrides` ({"vocab_file": ...}) replace flags whose files have moved.
    `root` is the checkpoint folder: relative file names are also looked up beside it."""
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


def tokenizer_vocab_size(args: dict) -> Optional[int]:
    """The training tokenizer's size before padding: saved by the trainer as `true_vocab_size`, or rebuilt
    from the saved tokenizer flags when they still find their files (older checkpoints); else None."""
    if args.get("true_vocab_size"):
        return int(args["true_vocab_size"])
    if args.get("tokenizer_type") is None:
        return None
    flags = {k: args.get(k) for k in TOKENIZER_FLAGS}
    try:
        return build_tokenizer(TokenizerConfig(**flags)).vocab_size
    except Exception:  # noqa: BLE001 - moved files, a missing library: the caller falls back to --true-vocab-size
        return None
