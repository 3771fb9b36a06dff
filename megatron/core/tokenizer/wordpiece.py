"""BERT's WordPiece from a `vocab.txt` (`BertWordPieceLowerCase` / `BertWordPieceCase`), run by HF `tokenizers`.

`vocab.txt` holds one piece per line; the line number is the id. Pieces that continue a word start with
`##` ("playing" -> `play`, `##ing`), which is how whole-word masking finds word boundaries (`inv_vocab`).
Text is normalized and split as Google's BERT and Megatron-LM's `FullTokenizer` do: control characters
dropped, CJK characters split apart, whitespace and punctuation split off; `BertWordPieceLowerCase` also
lowercases and strips accents, `BertWordPieceCase` does neither. A word longer than 100 characters, or one
the vocab cannot spell, becomes `[UNK]`. Ids equal `tokenizers.BertWordPieceTokenizer(vocab.txt)`'s.

Special tokens, as in Megatron-LM's `_BertWordPieceTokenizer`:
- `[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]` must be in the vocab (`pad`, `cls`, `sep`, `mask`).
- `[BOS]` and `[EOS]` are appended after the last line when the vocab lacks them, so `vocab_size` is
  usually `len(vocab.txt) + 2` (the embedding has rows for them).
- EOD is `[EOS]`, Megatron's choice (`eod` returns `eos`); not `[SEP]`. BERT data is preprocessed with
  `--split-sentences` and without `--append-eod`, so EOD rarely appears in it.
- A special token written literally in the text (`"[MASK]"`) is plain text ("[", "mask", "]"), as in
  Megatron; only the dataset inserts special ids.

Round trip: `detokenize` is Megatron's `convert_tokens_to_string` (pieces joined by spaces, `" ##"`
removed), so "Hello, world!" comes back as "hello , world !": it is for reading samples, not exact text.
"""

from typing import Dict, List

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from megatron.core.errors import UserError
from megatron.core.tokenizer.base import TokenizersLibraryTokenizer, require_file

REQUIRED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ADDED_TOKENS = ("[BOS]", "[EOS]")  # appended when missing, as Megatron does
CONTINUATION_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100  # Google BERT's limit; longer words become [UNK]


def read_vocab(vocab_file: str) -> Dict[str, int]:
    """{piece: line number} of a BERT vocab.txt (each line stripped, as Megatron's `load_vocab` does)."""
    require_file(vocab_file, "--vocab-file", "a BERT WordPiece vocab.txt (one piece per line)")
    vocab: Dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.strip()
                if token in vocab:
                    raise UserError(f"--vocab-file {vocab_file} line {i + 1} repeats the piece {token!r} "
                                    f"(first on line {vocab[token] + 1}); each piece must appear once")
                vocab[token] = i
    except UnicodeDecodeError as e:
        raise UserError(f"--vocab-file {vocab_file} is not UTF-8 text ({e.reason}); pass a BERT vocab.txt")
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"--vocab-file {vocab_file} has no {' '.join(missing)}; a BERT WordPiece vocab needs "
                        f"{' '.join(REQUIRED_TOKENS)} (train one with tools/train_tokenizer.py --type wordpiece)")
    return vocab


class BertWordPieceTokenizer(TokenizersLibraryTokenizer):
    """WordPiece from vocab.txt; `lower_case` selects BertWordPieceLowerCase (True) or BertWordPieceCase."""

    def __init__(self, vocab_file: str, lower_case: bool = True):
        vocab = read_vocab(vocab_file)
        self.lower_case = lower_case
        self._tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]",
                                                 max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
        # strip_accents=None: accents are stripped exactly when lowercasing, as in Google's BERT.
        self._tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=None, lowercase=lower_case)
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        for token in ADDED_TOKENS:  # outside the HF model: never produced by tokenize, only by the caller
            vocab.setdefault(token, len(vocab))
        self._vocab = vocab
        self._inv_vocab = {i: t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}  # ordered by id
        self._vocab_size = len(vocab)
        self._pad, self._cls, self._sep, self._mask = (vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
        self._unk, self._bos, self._eos = vocab["[UNK]"], vocab["[BOS]"], vocab["[EOS]"]
        self._eod = self._eos

    @property
    def vocab(self) -> Dict[str, int]:
        """{piece: id}, `[BOS]`/`[EOS]` included."""
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """{id: piece} in id order; a piece starting with `##` continues the previous word."""
        return self._inv_vocab

    @property
    def unk(self) -> int:
        return self._unk

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    def detokenize(self, ids: List[int]) -> str:
        """Megatron's `convert_tokens_to_string`: pieces joined by spaces, word continuations glued on."""
        try:
            pieces = [self._inv_vocab[int(i)] for i in ids]
        except KeyError as e:
            raise UserError(f"id {e.args[0]} is outside this WordPiece vocab of {self._vocab_size}")
        return " ".join(pieces).replace(" " + CONTINUATION_PREFIX, "").strip()
