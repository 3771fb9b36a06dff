"""GPT-2's byte-level BPE from `vocab.json` + `merges.txt`, run by HF `tokenizers`.

Byte-level means every UTF-8 byte has its own symbol in the vocab, so any text encodes without an unknown
token and `detokenize(tokenize(text)) == text` exactly. Pre-tokenization is GPT-2's regex (split off
contractions, letter runs, digit runs, punctuation runs and whitespace, a leading space kept on the word),
and no space is added in front of the text: the same ids as OpenAI's encoder and Megatron's
`GPT2BPETokenizer`.

`<|endoftext|>` is the EOD id. As in Megatron it is not registered as a special token: a document that
literally contains the string `<|endoftext|>` is encoded as ordinary text, so data can never smuggle in a
fake document boundary.
"""

import json

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from megatron.core.errors import UserError
from megatron.core.tokenizer.base import TokenizersLibraryTokenizer, require_file

EOD_TOKEN = "<|endoftext|>"


def _read_vocab(vocab_file: str) -> dict:
    """Load and check vocab.json: a {token: id} object holding EOD and all 256 byte symbols."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--vocab-file {vocab_file} is not a JSON vocab ({e}); pass GPT-2's vocab.json")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
        raise UserError(f"--vocab-file {vocab_file} must be a JSON object of token -> non-negative id")
    if EOD_TOKEN not in vocab:
        raise UserError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} token; GPT2BPETokenizer uses it as "
                        f"EOD (train with tools/train_tokenizer.py, which adds it)")
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise UserError(f"--vocab-file {vocab_file} lacks {len(missing)} of the 256 byte-level symbols; "
                        f"it is not a GPT-2 byte-level BPE vocab")
    return vocab


class GPT2BPETokenizer(TokenizersLibraryTokenizer):
    """GPT-2 byte-level BPE; EOD = `<|endoftext|>`; exact round trip for any text."""

    def __init__(self, vocab_file: str, merge_file: str):
        require_file(vocab_file, "--vocab-file", "a GPT-2 vocab.json")
        require_file(merge_file, "--merge-file", "a GPT-2 merges.txt")
        vocab = _read_vocab(vocab_file)
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed merges file
            raise UserError(f"--merge-file {merge_file} does not fit --vocab-file {vocab_file}: {e}")
        self._tok = HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tok.decoder = decoders.ByteLevel()
        self._eod = vocab[EOD_TOKEN]
        self._vocab_size = max(vocab.values()) + 1  # ids need not be dense; the embedding must cover all


