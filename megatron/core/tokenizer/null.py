"""`NullTokenizer --vocab-size N`: the text already is the ids, as whitespace-separated integers.

For benchmarks and mock data, where no real tokenizer is wanted. Semantics follow Megatron-LM's
`_NullTokenizer` (checked against its source): ids `0 .. N-1` are ordinary, EOD is `N`, and `vocab_size`
is `N + 1` so the embedding has a row for EOD. (So `--vocab-size` counts the ordinary ids, not EOD.)

Unlike Megatron, which splits on single spaces and accepts any integer, this splits on any whitespace
(so the empty text is no ids) and rejects a non-integer or an id outside `range(N + 1)` with a UserError,
since a bad id would otherwise surface much later as an embedding index error.
"""

from typing import List

from megatron.core.errors import UserError
from megatron.core.tokenizer.base import Tokenizer


class NullTokenizer(Tokenizer):
    """Ids written as text; EOD = N, vocab_size = N + 1 (Megatron's convention)."""

    def __init__(self, vocab_size: int):
        assert vocab_size >= 1, "TokenizerConfig checks --vocab-size"
        self._n = int(vocab_size)
        self._vocab_size, self._eod = self._n + 1, self._n

    def tokenize(self, text: str) -> List[int]:
        ids = []
        for word in text.split():
            try:
                i = int(word)
            except ValueError:
                raise UserError(f"NullTokenizer reads whitespace-separated integer ids, got {word[:40]!r}")
            if not 0 <= i <= self._n:
                raise UserError(f"NullTokenizer id {i} is outside 0..{self._n} (--vocab-size {self._n})")
            ids.append(i)
        return ids

    def detokenize(self, ids: List[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
