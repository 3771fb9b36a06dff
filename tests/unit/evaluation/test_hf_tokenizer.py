"""SentencePiece models as tokenizer.json: ids and decoded text equal SentencePiece's own on text the
probe never saw, for the options SentencePiece users train with; what cannot be matched is refused."""

import io
import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from megatron.core.errors import UserError
from megatron.core.tokenizer.sentencepiece import SentencePieceTokenizer
from megatron.evaluation import hf_tokenizer
from tests.unit.evaluation import fixtures

VARIANTS = {  # SentencePiece defaults (NFKC, dummy prefix, extra-whitespace removal) and the edge cases
    "bpe_defaults": dict(model_type="bpe"),
    "unigram_defaults": dict(model_type="unigram"),
    "bpe_without_eos": dict(model_type="bpe", eos_id=-1),  # our EOD becomes one appended id
    "bpe_user_defined": dict(model_type="bpe", user_defined_symbols=["<sep>", "cat"]),
    "unigram_identity": dict(model_type="unigram", normalization_rule_name="identity", add_dummy_prefix=False,
                             remove_extra_whitespaces=False),
    "bpe_no_byte_fallback": dict(model_type="bpe", byte_fallback=False),  # unknown text is <unk>, " ⁇ " decoded
}


def train(tmp_path, name, **options):
    rng = random.Random(0)
    lines = [fixtures.sentence(rng, 20) + " <sep> Tree, 42!" for _ in range(150)]
    model = io.BytesIO()
    options = dict(dict(byte_fallback=True, vocab_size=400, hard_vocab_limit=False, minloglevel=2), **options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    path = tmp_path / f"{name}.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(str(path))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sentencepiece_tokenizer_json_encodes_and_decodes_as_ours(tmp_path, name):
    ours = train(tmp_path, name, **VARIANTS[name])
    tok = hf_tokenizer.tokenizers_object(ours)
    hf_tokenizer.save_tokenizer(tok, ours, str(tmp_path / "hf"), 64)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.eos_token_id == ours.eod
    lines = fixtures.corpus_lines()
    assert len(lines) >= 300
    for text in lines:
        ids = ours.tokenize(text)
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == ours.detokenize(ids), text


def test_an_unfaithful_conversion_is_refused(tmp_path, monkeypatch):
    from tokenizers import normalizers

    ours = train(tmp_path, "m", model_type="bpe")
    build = hf_tokenizer._sentencepiece_object

    def without_normalizer(tokenizer):  # spaces no longer become "▁": every line with a space differs
        tok = build(tokenizer)
        tok.normalizer = normalizers.Sequence([])
        return tok

    monkeypatch.setattr(hf_tokenizer, "_sentencepiece_object", without_normalizer)
    with pytest.raises(UserError, match="no faithful tokenizer.json"):
        hf_tokenizer.tokenizers_object(ours)


def test_a_char_model_is_refused(tmp_path):
    ours = train(tmp_path, "char", model_type="char")
    with pytest.raises(UserError, match="SentencePiece char model is not supported"):
        hf_tokenizer.tokenizers_object(ours)
