"""Our tokenizer as a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) that encodes exactly as ours.

| ours                              | tokenizer.json                                                    |
|-----------------------------------|-------------------------------------------------------------------|
| GPT2BPE, HuggingFaceTokenizer     | a copy of the pipeline our tokenizer runs, without post-processor |
| NullTokenizer                     | whitespace word-level vocab `"0".."N"`                            |
| SentencePiece (BPE or unigram)    | rebuilt from the model's pieces, scores and normalizer spec       |

Nothing is added on encode (no BOS/EOS), as in our training data. EOD is the EOS, BOS (lm-eval's
empty-context prefix) and pad token. One difference for every type: the HF tokenizer treats a literal
special token in the text (`<|endoftext|>`, `</s>`) as that token, ours as plain text.

SentencePiece. The `.model` protobuf is read with sentencepiece's own schema (protobuf comes with
tensorboard): BPE becomes a `tokenizers` BPE whose merges are ranked by the merged piece's score, as
SentencePiece merges the best-scoring pair first; unigram becomes a `tokenizers` Unigram with the same
scores; byte fallback, whitespace escaping (`▁`), dummy prefix, extra-whitespace removal, a precompiled
normalization map, user-defined pieces and the unknown piece's surface (` ⁇ `) carry over. Because
the two libraries implement these separately, the result is checked before anything is written: a few
hundred probe lines (the model's own pieces recombined, plus spaces, newlines, digits, accents, CJK and
emoji for byte fallback) must give our ids and decode back to our text; otherwise the export is refused
with the first line that differs.
"""

import json
import os
import random
import re
from typing import List

from megatron.core.errors import UserError

APPENDED_EOD = "<|endoftext|>"  # the name of the EOD id a SentencePiece model without eos gets from us
# Lines no piece recombination produces: whitespace runs, control characters, and text outside a small
# model's pieces (byte fallback).
PROBE_EXTRAS = ["", " ", "  ", "\n", "a\n\nb", "\tindent\tand tab", "  leading and trailing  ",
                "double  space   triple", "digits 0123456789 3.14159 -42",
                "Punctuation: (a, b); [c]! {d}? 'e' \"f\"",
                "naïve café résumé Ångström", "日本語のテキスト 中文", "emoji 🙂🚀 and symbols ∑√∞ €£",
                "ends with a space ", "▁literal marker", "mixed\r\nline endings\r"]


def _sentencepiece_object(tokenizer):
    """A `tokenizers.Tokenizer` built from our SentencePieceTokenizer's model (see module docstring)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the schema needs protobuf
        raise UserError(f"exporting a SentencePiece tokenizer needs protobuf ({e}); pip install protobuf")
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer._sp.serialized_model_proto())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # ModelProto.SentencePiece.Type (6: byte)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    user_defined = [piece for piece, _, kind in pieces if kind == USER_DEFINED]
    if spec.model_type == 2:  # BPE: merge (left, right) ranked by the score of left+right, best first
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == NORMAL}
        ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        model = BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=spec.unk_piece,
                    fuse_unk=True, byte_fallback=spec.byte_fallback,
                    ignore_merges=bool(user_defined))  # a user-defined piece, isolated below, is one token
    elif spec.model_type == 1:  # unigram
        model = Unigram([(piece, score) for piece, score, _ in pieces], unk_id=spec.unk_id,
                        byte_fallback=spec.byte_fallback)
    else:
        kind = {3: "word", 4: "char"}.get(spec.model_type, str(spec.model_type))
        raise UserError(f"exporting a SentencePiece {kind} model is not supported (BPE and unigram are); the "
                        f"weights would export, but the tokenizer has no tokenizer.json equivalent")
    tok = HFTokenizer(model)

    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:  # spaces only: SentencePiece keeps other whitespace
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    if user_defined:  # SentencePiece emits these whole and never merges across them
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    steps = [decoders.Replace(spec.unk_piece, spec.unk_surface)] if spec.unk_surface else []  # " ⁇ " as ours
    steps += [decoders.Replace("▁", " ")] if norm.escape_whitespaces else []
    steps += [decoders.ByteFallback()] if spec.byte_fallback else []
    steps += [decoders.Fuse()]
    steps += [decoders.Strip(content=" ", left=1)] if norm.add_dummy_prefix else []
    tok.decoder = decoders.Sequence(steps)

    specials = [AddedToken(piece, special=True, normalized=False)
                for piece, _, kind in pieces if kind in (UNKNOWN, CONTROL)]
    tok.add_special_tokens(specials)
    if tokenizer.eod == len(pieces):  # our appended EOD (model trained with eos_id=-1)
        tok.add_special_tokens([AddedToken(APPENDED_EOD, special=True, normalized=False)])
        assert tok.token_to_id(APPENDED_EOD) == tokenizer.eod, "appended EOD must follow the pieces"
    return tok


def probe_lines(tokenizer, n: int = 300, seed: int = 0) -> List[str]:
    """`n` lines of the model's own pieces recombined at random, after PROBE_EXTRAS."""
    rng = random.Random(seed)
    sp = tokenizer._sp
    texts = [sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size())
             if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    lines = list(PROBE_EXTRAS)
    while texts and len(lines) < n:
        lines.append("".join(rng.choice(texts) for _ in range(rng.randint(1, 12))))
    return lines


def check_faithful(tokenizer, tok, lines) -> None:
    """UserError at the first line whose ids or decoded text differ between ours and `tok`."""
    for line in lines:
        ours, theirs = tokenizer.tokenize(line), tok.encode(line, add_special_tokens=False).ids
        if ours != theirs:
            raise UserError(f"the tokenizer has no faithful tokenizer.json: {line[:40]!r} encodes as "
                            f"{theirs[:8]} there, {ours[:8]} here; the export was not written")
        if tok.decode(theirs, skip_special_tokens=False) != tokenizer.detokenize(ours):
            raise UserError(f"the tokenizer has no faithful tokenizer.json: {line[:40]!r} decodes differently; "
                            f"the export was not written")


def tokenizers_object(tokenizer):
    """A `tokenizers.Tokenizer` that encodes exactly as our tokenizer does (checked for SentencePiece)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from megatron.core.tokenizer.null import NullTokenizer
    from megatron.core.tokenizer.sentencepiece import SentencePieceTokenizer

    if isinstance(tokenizer, NullTokenizer):
        vocab = {str(i): i for i in range(tokenizer.vocab_size)}  # ids as words; EOD is "N"
        tok = HFTokenizer(models.WordLevel(vocab, unk_token=str(tokenizer.eod)))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins words with spaces
        return tok
    if isinstance(tokenizer, SentencePieceTokenizer):
        tok = _sentencepiece_object(tokenizer)
        check_faithful(tokenizer, tok, probe_lines(tokenizer))
        return tok
    if not hasattr(tokenizer, "_tok"):
        raise UserError(f"exporting a {type(tokenizer).__name__} is not supported; the weights would export, "
                        f"but the tokenizer has no tokenizer.json: train with GPT2BPETokenizer, "
                        f"HuggingFaceTokenizer or SentencePieceTokenizer")
    tok = HFTokenizer.from_str(tokenizer._tok.to_str())  # a copy of the exact pipeline our tokenizer runs
    tok.post_processor = None  # our tokenize() adds no special tokens
    tok.no_padding()
    tok.no_truncation()
    return tok


def save_tokenizer(tok, tokenizer, out_dir: str, max_length: int):
    """Write `tok` (from `tokenizers_object`) as tokenizer.json + tokenizer_config.json for AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    eod, pad = tok.id_to_token(tokenizer.eod), tok.id_to_token(tokenizer.pad)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eod, eos_token=eod, pad_token=pad,
                                     unk_token=None, model_max_length=max_length,
                                     clean_up_tokenization_spaces=False)
    hf_tok.save_pretrained(out_dir)
    # transformers 5 names its own class ("TokenizersBackend"); the 4.x name loads in both.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_config = json.load(f)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(tok_config, f, indent=2)
    return hf_tok
