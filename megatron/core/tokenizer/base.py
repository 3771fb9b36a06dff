"""The one interface every tokenizer implements.

Data preprocessing, the datasets and the trainer only ever see this interface, so a new tokenizer type is
one file plus one line in `build_tokenizer`.
"""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional

from megatron.core.errors import UserError

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
)

# The flag each type cannot do without, with what to pass; checked once, in `TokenizerConfig`.
_REQUIRED = {
    "GPT2BPETokenizer": (("vocab_file", "--vocab-file", "a GPT-2 vocab.json"),
                         ("merge_file", "--merge-file", "a GPT-2 merges.txt")),
    "SentencePieceTokenizer": (("tokenizer_model", "--tokenizer-model", "a SentencePiece .model file"),),
    "HuggingFaceTokenizer": (("tokenizer_model", "--tokenizer-model", "a tokenizer.json or its folder"),),
    "NullTokenizer": (("vocab_size", "--vocab-size", "the number of ordinary ids N (EOD becomes N)"),),
    "BertWordPieceLowerCase": (("vocab_file", "--vocab-file", "a BERT WordPiece vocab.txt"),),
    "BertWordPieceCase": (("vocab_file", "--vocab-file", "a BERT WordPiece vocab.txt"),),
}


@dataclass
class TokenizerConfig:
    """Megatron's tokenizer flags, as plain data. Validated here so every entry point fails the same way."""

    tokenizer_type: str
    vocab_file: Optional[str] = None  # GPT2BPETokenizer: vocab.json; BertWordPiece*: vocab.txt
    merge_file: Optional[str] = None  # GPT2BPETokenizer: merges.txt
    tokenizer_model: Optional[str] = None  # SentencePiece .model, or HF tokenizer.json / folder
    vocab_size: Optional[int] = None  # NullTokenizer only

    def __post_init__(self):
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise UserError(f"--tokenizer-type {self.tokenizer_type!r} is not supported; "
                            f"choose one of {', '.join(TOKENIZER_TYPES)}")
        for field, flag, what in _REQUIRED[self.tokenizer_type]:
            if getattr(self, field) is None:
                raise UserError(f"--tokenizer-type {self.tokenizer_type} needs {flag}: pass {what}")
        positive = isinstance(self.vocab_size, int) and self.vocab_size >= 1
        if self.tokenizer_type == "NullTokenizer" and not positive:
            raise UserError(f"--vocab-size must be a positive integer, got {self.vocab_size}")


def require_file(path: str, flag: str, what: str) -> str:
    """Return `path` if it is a readable file, else raise a UserError naming the flag and the fix.

    Checked up front because the libraries underneath report a missing file as a parse error.
    """
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file; pass the path to {what}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; pass the path to {what}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path} is not readable; check its permissions")
    return path


class Tokenizer(ABC):
    """Text <-> token ids. `vocab_size` is the unpadded size; the trainer pads it for the embedding.

    Every id a tokenizer can return, EOD included, is in `range(vocab_size)`. Subclasses set
    `_vocab_size` and `_eod` (and `_pad` when they have their own padding token) in `__init__`.
    BERT's special tokens `cls`, `sep`, `mask` are optional: only WordPiece vocabs have them (`_cls`,
    `_sep`, `_mask`), and asking another tokenizer for one is a UserError naming the fix.
    """

    _vocab_size: int
    _eod: int
    _pad: Optional[int] = None
    _cls: Optional[int] = None
    _sep: Optional[int] = None
    _mask: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id, appended by `preprocess_data.py --append-eod`."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id; the EOD id unless the tokenizer has its own."""
        return self._eod if self._pad is None else self._pad

    @property
    def cls(self) -> int:
        """`[CLS]`, the first token of a BERT sample."""
        return self._special(self._cls, "[CLS]")

    @property
    def sep(self) -> int:
        """`[SEP]`, closing each segment of a BERT sample."""
        return self._special(self._sep, "[SEP]")

    @property
    def mask(self) -> int:
        """`[MASK]`, what masked-LM replaces most chosen tokens with."""
        return self._special(self._mask, "[MASK]")

    def _special(self, token_id: Optional[int], name: str) -> int:
        if token_id is None:
            raise UserError(f"tokenizer {type(self).__name__} has no {name} token; BERT needs a WordPiece "
                            "vocab (--tokenizer-type BertWordPieceLowerCase or BertWordPieceCase "
                            "--vocab-file vocab.txt)")
        return token_id

    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Ids of `text`, with no special tokens added (EOD is appended by the caller)."""

    @abstractmethod
    def detokenize(self, ids: List[int]) -> str:
        """Text of `ids`; `detokenize(tokenize(t)) == t` wherever the type's docstring says so."""

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        """`[tokenize(t) for t in texts]`; a type whose library encodes a batch in one call overrides it."""
        return [self.tokenize(t) for t in texts]


class TokenizersLibraryTokenizer(Tokenizer):
    """Shared encode/decode for the types backed by an HF `tokenizers.Tokenizer` in `self._tok`."""

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        """One `encode_batch` call: no Python round trip per text, and the library spreads the batch over
        its threads unless `TOKENIZERS_PARALLELISM=false` (then one thread, the caller's)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: List[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
