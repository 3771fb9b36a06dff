"""BertWordPieceLowerCase / BertWordPieceCase: ids against HF `tokenizers`' BertWordPieceTokenizer and by
hand, Megatron's special tokens ([BOS]/[EOS] appended, EOD = [EOS]), and the optional cls/sep/mask."""

import argparse

import pytest
from pydoc_data.topics import topics
from tokenizers import BertWordPieceTokenizer as HFBertWordPiece

from megatron.core.errors import UserError
from megatron.core.tokenizer import add_tokenizer_args, build_tokenizer, tokenizer_config_from_args
from megatron.core.tokenizer.null import NullTokenizer
from megatron.core.tokenizer.wordpiece import BertWordPieceTokenizer

CORPUS = [topics[k] for k in sorted(topics)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRICKY = [
    "",
    "Hello, World!  Tabs\tand\nnewlines\r\n",
    "Naïve café, RÉSUMÉ, Ångström and ﬁ ligatures",
    "日本語のテキスト, Ελληνικά, русский, العربية",
    "control \x00\x01\x7f chars, zero\u200bwidth and nbsp\u00a0here",
    "don't we'll 3.14159 -42 1e-9 x_y a/b (paren) [bracket] {brace}",
    "a" * 150 + " words longer than 100 characters are unknown",
    "emoji 🤖🧪 and <|endoftext|> as text",
]
# The classic example from Google's BERT README, plus pieces for the cases below.
TINY = SPECIALS + ["un", "##aff", "##able", "the", ",", "!", "cafe", "café", "a", "##a", "[", "]", "mask"]


def write_vocab(path, tokens):
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny(tmp_path):
    return write_vocab(tmp_path / "vocab.txt", TINY)


@pytest.fixture(scope="module", params=[True, False], ids=["lower", "cased"])
def trained(request, tmp_path_factory):
    """A 3000-piece vocab trained by HF tokenizers on Python's help topics; (ours, HF's) on that file."""
    lower = request.param
    out = tmp_path_factory.mktemp("wordpiece")
    hf = HFBertWordPiece(lowercase=lower)
    hf.train_from_iterator(CORPUS, vocab_size=3000, special_tokens=SPECIALS, show_progress=False)
    hf.save_model(str(out))
    vocab = str(out / "vocab.txt")
    return BertWordPieceTokenizer(vocab, lower_case=lower), HFBertWordPiece(vocab, lowercase=lower)


def test_ids_equal_hf_bert_wordpiece_on_a_trained_vocab(trained):
    ours, ref = trained
    for text in CORPUS + TRICKY:
        assert ours.tokenize(text) == ref.encode(text, add_special_tokens=False).ids, text[:60]
    assert ours.vocab_size == ref.get_vocab_size() + 2  # [BOS], [EOS] appended, as Megatron does



def test_tokenize_batch_equals_hf_per_text(trained):
    ours, ref = trained
    texts = CORPUS[:40] + TRICKY
    assert ours.tokenize_batch(texts) == [ref.encode(t, add_special_tokens=False).ids for t in texts]

def test_tiny_vocab_worked_out_by_hand(tiny):
    lower = BertWordPieceTokenizer(tiny, lower_case=True)
    cased = BertWordPieceTokenizer(tiny, lower_case=False)
    # lowercased and split on punctuation: un ##aff ##able , the !
    assert lower.tokenize("UNaffable, the!") == [5, 6, 7, 9, 8, 10]
    assert lower.tokenize("Café") == [11]  # lowercase also strips accents
    assert cased.tokenize("café") == [12] and cased.tokenize("Café") == [1]  # cased keeps both: [UNK]
    assert lower.tokenize("aaa") == [13, 14, 14]
    assert lower.tokenize("a" * 100) == [13] + [14] * 99 and lower.tokenize("a" * 101) == [1]
    assert lower.tokenize("日本") == [1, 1]  # CJK characters are words of their own
    assert lower.tokenize("[MASK]") == [15, 17, 16]  # a literal special token is plain text
    assert lower.detokenize(lower.tokenize("UNaffable, the!")) == "unaffable , the !"  # Megatron's join


def test_special_tokens_follow_megatron(tiny, tmp_path):
    tok = BertWordPieceTokenizer(tiny)
    assert (tok.pad, tok.unk, tok.cls, tok.sep, tok.mask) == (0, 1, 2, 3, 4)
    assert (tok.bos, tok.eos, tok.vocab_size) == (len(TINY), len(TINY) + 1, len(TINY) + 2)
    assert tok.eod == tok.eos  # Megatron's _BertWordPieceTokenizer.eod returns eos, not [SEP]
    assert list(tok.inv_vocab) == list(range(tok.vocab_size))  # id order: the random-token lookup
    assert [i for i, t in tok.inv_vocab.items() if t.startswith("##")] == [6, 7, 14]
    assert tok.vocab["[EOS]"] == tok.eos and tok.detokenize([tok.cls, 5, 6, tok.sep]) == "[CLS] unaff [SEP]"
    own = BertWordPieceTokenizer(write_vocab(tmp_path / "eos.txt", TINY + ["[EOS]", "[BOS]"]))
    assert (own.eos, own.bos, own.vocab_size) == (len(TINY), len(TINY) + 1, len(TINY) + 2)  # not re-added


def test_built_from_megatron_flags(tiny):
    parser = add_tokenizer_args(argparse.ArgumentParser())
    for kind, lower in (("BertWordPieceLowerCase", True), ("BertWordPieceCase", False)):
        tok = build_tokenizer(tokenizer_config_from_args(parser.parse_args(
            ["--tokenizer-type", kind, "--vocab-file", tiny])))
        assert isinstance(tok, BertWordPieceTokenizer) and tok.lower_case is lower
    with pytest.raises(UserError, match="BertWordPieceCase needs --vocab-file: pass a BERT WordPiece vocab.txt"):
        tokenizer_config_from_args(parser.parse_args(["--tokenizer-type", "BertWordPieceCase"]))


def test_other_tokenizers_have_no_bert_specials():
    tok = NullTokenizer(10)
    for name, token in (("cls", "CLS"), ("sep", "SEP"), ("mask", "MASK")):
        with pytest.raises(UserError, match=rf"tokenizer NullTokenizer has no \[{token}\] token; BERT needs a "
                                            "WordPiece vocab"):
            getattr(tok, name)


def test_bad_vocab_files(tmp_path):
    with pytest.raises(UserError, match="--vocab-file .*no such file"):
        BertWordPieceTokenizer(str(tmp_path / "missing.txt"))
    no_mask = write_vocab(tmp_path / "no_mask.txt", [t for t in TINY if t != "[MASK]"])
    with pytest.raises(UserError, match=r"has no \[MASK\]; a BERT WordPiece vocab needs"):
        BertWordPieceTokenizer(no_mask)
    with pytest.raises(UserError, match="line 19 repeats the piece 'the' \\(first on line 9\\)"):
        BertWordPieceTokenizer(write_vocab(tmp_path / "dup.txt", TINY + ["the"]))
    (tmp_path / "latin1.txt").write_bytes("\n".join(SPECIALS + ["caf\xe9"]).encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8"):
        BertWordPieceTokenizer(str(tmp_path / "latin1.txt"))
    tok = BertWordPieceTokenizer(write_vocab(tmp_path / "ok.txt", TINY))
    with pytest.raises(UserError, match="id 99 is outside this WordPiece vocab of 20"):
        tok.detokenize([99])
