"""A SentencePiece model (`--tokenizer-model tokenizer.model`), e.g. from `tools/train_tokenizer.py`.

EOD is the model's end-of-sentence id (`</s>` unless the model was trained with another `eos_piece`).
Fallback for a model trained with `eos_id=-1`: EOD becomes one extra id just past the model's pieces, and
`vocab_size` grows by one to hold it (Megatron likewise appends its own `<EOD>` to a SentencePiece vocab
that lacks one). Either way EOD detokenizes to the empty string, as SentencePiece renders control tokens.

Round trip: exact for any text when the model was trained the way `tools/train_tokenizer.py` trains it
(identity normalization, whitespace kept, byte fallback), except that the character U+2581 `▁`, which
SentencePiece uses to mark spaces, comes back as a space. Models trained with default options normalize
text (NFKC, collapsed spaces), so their round trip is only up to that normalization.
"""

from typing import List

import sentencepiece as spm

from megatron.core.errors import UserError
from megatron.core.tokenizer.base import Tokenizer, require_file


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece `.model`; EOD = the model's eos id (or one appended id, see module docstring)."""

    def __init__(self, model_file: str):
        require_file(model_file, "--tokenizer-model", "a SentencePiece .model file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise UserError(f"--tokenizer-model {model_file} is not a SentencePiece model ({e}); "
                            f"pass a .model file (tokenizer.json goes with HuggingFaceTokenizer)")
        n = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        self._appended_eod = eos < 0
        self._eod = n if self._appended_eod else eos
        self._vocab_size = n + 1 if self._appended_eod else n
        pad = self._sp.pad_id()
        self._pad = pad if pad >= 0 else self._eod




    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: List[int]) -> str:
        ids = [int(i) for i in ids]
        if self._appended_eod:  # SentencePiece does not know the appended id; render it as nothing
            ids = [i for i in ids if i != self._eod]
        return self._sp.decode(ids)
