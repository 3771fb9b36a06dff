"""Any tokenizer saved by HF `tokenizers` as `tokenizer.json` (`--tokenizer-model FILE_OR_FOLDER`).

Loaded with `tokenizers.Tokenizer.from_file` only: no `transformers`, no hub, nothing downloaded. A folder
saved by `transformers` (`save_pretrained`) holds a `tokenizer.json` and works; a folder with only "slow"
vocab files does not.

`tokenize` adds no special tokens (no BOS/CLS from the tokenizer's post-processor): preprocessing appends
EOD itself, and the ids stay the ids of the text alone. Special tokens written literally in the text are
still recognised, as HF and Megatron's HuggingFaceTokenizer do (unlike GPT2BPETokenizer, where a literal
`<|endoftext|>` is plain text). Truncation and padding saved in the file are
switched off. Round trip is exact when the tokenizer's normalizer is lossless (byte-level BPEs such as
GPT-2's or Llama 3's); a lowercasing or accent-stripping one returns the normalized text.

EOD is the first of `EOD_CANDIDATES` present in the vocab; `[SEP]` is last because Megatron's BERT
tokenizer uses it as EOD.
"""

import os

from tokenizers import Tokenizer as HFTokenizer

from megatron.core.errors import UserError
from megatron.core.tokenizer.base import TokenizersLibraryTokenizer, require_file

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


def _resolve(path: str) -> str:
    """The tokenizer.json that `--tokenizer-model path` means."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise UserError(f"--tokenizer-model folder {os.path.dirname(path)} has no tokenizer.json; "
                            f"pass a folder or file saved by HF tokenizers/transformers")
    return require_file(path, "--tokenizer-model", "a tokenizer.json or a folder holding one")


class HuggingFaceTokenizer(TokenizersLibraryTokenizer):
    """A `tokenizer.json`; EOD from the common end-of-text tokens; no special tokens added on encode."""

    def __init__(self, path: str):
        path = _resolve(path)
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise UserError(f"--tokenizer-model {path} is not a HF tokenizers tokenizer.json ({e})")
        self._tok.no_truncation()
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = [t for t in EOD_CANDIDATES if t in vocab]
        if not eod:
            raise UserError(f"--tokenizer-model {path} has none of the end-of-text tokens "
                            f"{' '.join(EOD_CANDIDATES)}; add one of them to the tokenizer")
        self._eod = vocab[eod[0]]
        pad = [t for t in PAD_CANDIDATES if t in vocab]
        self._pad = vocab[pad[0]] if pad else self._eod
        self._vocab_size = max(vocab.values()) + 1



