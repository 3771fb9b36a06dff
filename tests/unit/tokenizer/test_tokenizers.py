"""Each tokenizer type: ids against an independent truth, exact round trip, EOD, vocab size, user errors."""

import argparse
import io
import json

import pytest
import sentencepiece as spm
from pydoc_data.topics import topics
from tokenizers import ByteLevelBPETokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from megatron.core.errors import UserError
from megatron.core.tokenizer import (TokenizerConfig, add_tokenizer_args, build_tokenizer,
                                     tokenizer_config_from_args)
from megatron.core.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron.core.tokenizer.huggingface import HuggingFaceTokenizer
from megatron.core.tokenizer.null import NullTokenizer
from megatron.core.tokenizer.sentencepiece import SentencePieceTokenizer

CORPUS = [topics[k] for k in sorted(topics)]
TRICKY = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "don't we'll they're I'm",
    "日本語のテキスト, Ελληνικά, русский, עברית, العربية",
    "emoji 🤖🧪 and a ZWJ family 👩\u200d👩\u200d👧",
    "combining e\u0301 vs precomposed é; ligature ﬁ; fullwidth ＡＢＣ",
    "control \x00\x01\x7f and lone\u00a0nbsp",
    "the literal <|endoftext|> and </s> are just text here",
    "numbers 1234567890 3.14159 -42 1e-9",
]


def gpt2_byte_symbols():
    """GPT-2's byte -> printable symbol table, written out here from its definition (an independent truth):
    printable Latin-1 bytes map to themselves, the other 68 bytes to chr(256), chr(257), ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------- GPT-2 BPE, tiny hand-written vocab


@pytest.fixture
def tiny_gpt2(tmp_path):
    """Byte b has id b; then the merges `h e` (256), `Ġ t` (257), `Ġt he` (258); EOD 259."""
    sym = gpt2_byte_symbols()
    vocab = {sym[b]: b for b in range(256)}
    vocab.update({"he": 256, "Ġt": 257, "Ġthe": 258, "<|endoftext|>": 259})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nĠ t\nĠt he\n", encoding="utf-8")
    return tmp_path


def test_byte_symbols_match_tokenizers_alphabet():
    assert set(gpt2_byte_symbols().values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_gpt2_tiny_vocab_ids_worked_out_by_hand(tiny_gpt2):
    tok = GPT2BPETokenizer(str(tiny_gpt2 / "vocab.json"), str(tiny_gpt2 / "merges.txt"))
    # "the" -> t h e -> t he (no merge "t he")                      -> [116, 256]
    # " theme" -> Ġ t h e m e -> Ġ t he m e -> Ġt he m e -> Ġthe m e -> [258, 109, 101]
    assert tok.tokenize("the theme") == [116, 256, 258, 109, 101]
    assert tok.tokenize("thehe") == [116, 256, 256]  # both `h e` pairs merge
    assert tok.tokenize(" the") == [258]  # GPT-2 adds no prefix space, so " the" != "the"
    assert tok.tokenize("é") == [0xC3, 0xA9]  # UTF-8 bytes, no merges
    assert tok.tokenize("a  b") == [97, 32, 32, 98]  # regex: "a", " ", " b"; no Ġ merges for them
    assert tok.eod == 259 and tok.vocab_size == 260 and tok.pad == 259
    assert tok.detokenize([tok.eod]) == "<|endoftext|>"


def test_gpt2_tiny_vocab_round_trip(tiny_gpt2):
    tok = GPT2BPETokenizer(str(tiny_gpt2 / "vocab.json"), str(tiny_gpt2 / "merges.txt"))
    for text in TRICKY:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_gpt2_literal_endoftext_is_text_not_eod(tiny_gpt2):
    tok = GPT2BPETokenizer(str(tiny_gpt2 / "vocab.json"), str(tiny_gpt2 / "merges.txt"))
    ids = tok.tokenize("a<|endoftext|>b")
    assert tok.eod not in ids and tok.detokenize(ids) == "a<|endoftext|>b"


def test_gpt2_errors(tiny_gpt2):
    v, m = str(tiny_gpt2 / "vocab.json"), str(tiny_gpt2 / "merges.txt")
    with pytest.raises(UserError, match="--merge-file .*no such file"):
        GPT2BPETokenizer(v, str(tiny_gpt2 / "missing.txt"))
    with pytest.raises(UserError, match="--vocab-file .*is a folder"):
        GPT2BPETokenizer(str(tiny_gpt2), m)
    with pytest.raises(UserError, match="not a JSON vocab"):
        GPT2BPETokenizer(m, m)
    with pytest.raises(UserError, match="does not fit"):
        GPT2BPETokenizer(v, v)
    vocab = json.loads((tiny_gpt2 / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|endoftext|>"]
    (tiny_gpt2 / "no_eod.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(UserError, match=r"no <\|endoftext\|> token"):
        GPT2BPETokenizer(str(tiny_gpt2 / "no_eod.json"), m)
    (tiny_gpt2 / "ascii.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1}), encoding="utf-8")
    with pytest.raises(UserError, match="lacks 255 of the 256 byte-level symbols"):
        GPT2BPETokenizer(str(tiny_gpt2 / "ascii.json"), m)


# ---------------------------------------------------------------- GPT-2 BPE, trained vocab


@pytest.fixture(scope="module")
def trained_gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=1500, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out))
    bpe.save(str(out / "tokenizer.json"))
    return out


def test_gpt2_trained_matches_tokenizers_reference(trained_gpt2):
    v, m = str(trained_gpt2 / "vocab.json"), str(trained_gpt2 / "merges.txt")
    tok, ref = GPT2BPETokenizer(v, m), ByteLevelBPETokenizer(v, m)
    assert tok.vocab_size == ref.get_vocab_size() == 1500 and tok.eod == 0
    for text in TRICKY + CORPUS[:20]:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text).ids
        assert tok.detokenize(ids) == text


# ---------------------------------------------------------------- SentencePiece


def _train_sp(**extra):
    model = io.BytesIO()
    lines = [line for doc in CORPUS[:30] for line in doc.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, minloglevel=2, **extra)
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    for name, extra in [("plain", {}), ("no_eos", {"eos_id": -1}), ("pad", {"pad_id": 3})]:
        (out / f"{name}.model").write_bytes(_train_sp(**extra))
    return out


def test_sentencepiece_matches_library_and_round_trips(sp_models):
    path = str(sp_models / "plain.model")
    tok, ref = SentencePieceTokenizer(path), spm.SentencePieceProcessor(model_file=path)
    assert tok.vocab_size == 600 and tok.eod == ref.eos_id() == 2 and tok.pad == tok.eod
    for text in TRICKY + CORPUS[:5]:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text)
        assert tok.detokenize(ids) == text
    assert tok.detokenize([tok.eod]) == ""  # a control token renders as nothing


def test_sentencepiece_eod_fallback_and_pad(sp_models):
    tok = SentencePieceTokenizer(str(sp_models / "no_eos.model"))
    assert tok.eod == 600 and tok.vocab_size == 601  # appended just past the model's pieces
    ids = tok.tokenize("hello world")
    assert tok.detokenize(ids + [tok.eod]) == "hello world"
    tok = SentencePieceTokenizer(str(sp_models / "pad.model"))
    assert tok.pad == 3 and tok.eod == 2


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-model .*no such file"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        SentencePieceTokenizer(str(tmp_path / "tokenizer.json"))


# ---------------------------------------------------------------- HuggingFace tokenizer.json


def test_huggingface_file_and_folder_match_gpt2(trained_gpt2):
    gpt2 = GPT2BPETokenizer(str(trained_gpt2 / "vocab.json"), str(trained_gpt2 / "merges.txt"))
    for path in (trained_gpt2 / "tokenizer.json", trained_gpt2):
        tok = HuggingFaceTokenizer(str(path))
        assert tok.eod == 0 and tok.vocab_size == gpt2.vocab_size
        for text in TRICKY:
            assert tok.detokenize(tok.tokenize(text)) == text
            if "<|endoftext|>" not in text:
                assert tok.tokenize(text) == gpt2.tokenize(text)
        # tokenizer.json registers <|endoftext|> as a special token, and HF matches it inside text
        assert tok.tokenize("a<|endoftext|>b") == [*gpt2.tokenize("a"), 0, *gpt2.tokenize("b")]


def _word_level(path, vocab, post_bos=None):
    """A tiny whitespace word-level tokenizer.json; optionally a post-processor that prepends BOS."""
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{post_bos} $A", special_tokens=[(post_bos, vocab[post_bos])])
    tok.save(str(path))
    return str(path)


def test_huggingface_eod_pad_and_no_added_specials(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}
    tok = HuggingFaceTokenizer(_word_level(tmp_path / "t.json", vocab, post_bos="<s>"))
    assert tok.eod == 2 and tok.pad == 3 and tok.vocab_size == 6
    assert tok.tokenize("hello world") == [4, 5]  # the post-processor's BOS is not added


def test_huggingface_errors(tmp_path):
    no_eod = _word_level(tmp_path / "no_eod.json", {"<unk>": 0, "hello": 1})
    with pytest.raises(UserError, match="none of the end-of-text tokens"):
        HuggingFaceTokenizer(no_eod)
    with pytest.raises(UserError, match="has no tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        HuggingFaceTokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(UserError, match="is not a HF tokenizers tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------- Null


def test_null_tokenizer_follows_megatron():
    tok = NullTokenizer(100)
    assert tok.eod == 100 and tok.vocab_size == 101 and tok.pad == 100
    assert tok.tokenize("5 17  0\n99 100") == [5, 17, 0, 99, 100]
    assert tok.tokenize("") == []
    ids = [3, 1, 4, 1, 5, 100]
    assert tok.tokenize(tok.detokenize(ids)) == ids and tok.detokenize(ids) == "3 1 4 1 5 100"


def test_null_tokenizer_errors():
    tok = NullTokenizer(10)
    with pytest.raises(UserError, match="integer ids, got 'abc'"):
        tok.tokenize("1 abc 2")
    with pytest.raises(UserError, match="outside 0..10"):
        tok.tokenize("11")
    with pytest.raises(UserError, match="outside"):
        tok.tokenize("-1")



# ---------------------------------------------------------------- tokenize_batch (preprocess_data.py's path)


@pytest.mark.parametrize("parallelism", ["true", "false"])  # HF tokenizers: threads or the caller's thread
def test_tokenize_batch_equals_tokenize_each(trained_gpt2, sp_models, monkeypatch, parallelism):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
    texts = TRICKY + CORPUS[:20]
    for tok in (GPT2BPETokenizer(str(trained_gpt2 / "vocab.json"), str(trained_gpt2 / "merges.txt")),
                HuggingFaceTokenizer(str(trained_gpt2)), SentencePieceTokenizer(str(sp_models / "plain.model"))):
        assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts], type(tok).__name__
        assert tok.tokenize_batch([]) == []
    null = NullTokenizer(100)
    assert null.tokenize_batch(["1 2", "", "100"]) == [[1, 2], [], [100]]
    with pytest.raises(UserError, match="outside 0..100"):
        null.tokenize_batch(["1", "101"])

# ---------------------------------------------------------------- flags -> config -> tokenizer


def _parse(argv):
    return tokenizer_config_from_args(add_tokenizer_args(argparse.ArgumentParser()).parse_args(argv))


def test_flags_build_each_type(trained_gpt2, sp_models):
    cases = [
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(trained_gpt2 / "vocab.json"),
          "--merge-file", str(trained_gpt2 / "merges.txt")], GPT2BPETokenizer),
        (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(sp_models / "plain.model")],
         SentencePieceTokenizer),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(trained_gpt2)],
         HuggingFaceTokenizer),
        (["--tokenizer-type", "NullTokenizer", "--vocab-size", "50"], NullTokenizer),
    ]
    for argv, cls in cases:
        tok = build_tokenizer(_parse(argv))
        assert isinstance(tok, cls) and 0 <= tok.eod < tok.vocab_size


def test_flag_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-type is required"):
        _parse([])
    with pytest.raises(UserError, match="needs --merge-file"):
        _parse(["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"])
    with pytest.raises(UserError, match="needs --tokenizer-model"):
        _parse(["--tokenizer-type", "SentencePieceTokenizer"])
    with pytest.raises(UserError, match="needs --vocab-size"):
        _parse(["--tokenizer-type", "NullTokenizer"])
    with pytest.raises(UserError, match="--vocab-size must be a positive integer"):
        _parse(["--tokenizer-type", "NullTokenizer", "--vocab-size", "0"])
    with pytest.raises(UserError, match="is not supported"):
        TokenizerConfig("TikTokenizer")
    with pytest.raises(SystemExit):  # argparse's own error for a bad choice
        _parse(["--tokenizer-type", "Nope"])
    config = _parse(["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "v.json"),
                     "--merge-file", str(tmp_path / "m.txt")])
    with pytest.raises(UserError, match="--vocab-file .*v.json: no such file"):
        build_tokenizer(config)
