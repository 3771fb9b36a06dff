"""`preprocess_data.py --split-sentences` (BERT data) as a user runs it: sentences as sequences grouped by
document, files megatron-core reads and writes byte for byte, Punkt strictly offline, and the whole BERT
data path (train a WordPiece vocab -> preprocess -> BERT samples)."""

import argparse
import json
import shlex
import socket
import subprocess
import sys

import nltk
import nltk.data
import numpy as np
import pytest
from pydoc_data.topics import topics
from tokenizers import BertWordPieceTokenizer as HFBertWordPiece

from megatron.core.datasets.bert_dataset import BertDatasetConfig, build_bert_datasets
from megatron.core.datasets.indexed import IndexedDataset
from megatron.core.datasets.sentences import SentenceSplitter
from megatron.core.tokenizer import add_tokenizer_args, build_tokenizer, tokenizer_config_from_args
from megatron.core.tokenizer.wordpiece import BertWordPieceTokenizer
from tests.megatron_core_oracle import REPO, run_oracle
from tests.scripts import load_script

PREPROCESS = REPO / "tools" / "preprocess_data.py"
# Each document with the sentences any Punkt model finds in it (no abbreviations involved).
DOCS = [
    ({"text": "The cat sat on the mat. A dog ran away! Did it come back? Yes."},
     ["The cat sat on the mat.", "A dog ran away!", "Did it come back?", "Yes."]),
    ({"text": ""}, []),  # an empty document: no sentence, still a document
    ({"text": "Only one sentence here"}, ["Only one sentence here"]),
    ({"text": ["First item. It has two sentences.", "", "Second item."]},  # a list: each string split
     ["First item.", "It has two sentences.", "Second item."]),
    ({"text": "Line one.\n\nLine two after a blank line."}, ["Line one.", "Line two after a blank line."]),
]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    hf = HFBertWordPiece(lowercase=True)
    hf.train_from_iterator([topics[k] for k in sorted(topics)], vocab_size=1500,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    hf.save_model(str(out))
    return str(out / "vocab.txt")


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def bert_flags(vocab):
    return ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab]


def test_cli_writes_one_sequence_per_sentence_grouped_by_document(tmp_path, vocab):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [doc for doc, _ in DOCS])
    r = subprocess.run([sys.executable, str(PREPROCESS), "--input", corpus, "--output-prefix", str(tmp_path / "c"),
                        "--split-sentences", "--punkt", "untrained", "--workers", "2", *bert_flags(vocab)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote " + str(tmp_path / "c_text_sentence") + ".bin/.idx: 5 documents, 10 sentences" in r.stdout
    assert "splitting sentences with nltk's untrained Punkt" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("c_")) == [
        "c_text_sentence.bin", "c_text_sentence.idx"]
    ds = IndexedDataset(str(tmp_path / "c_text_sentence"))
    tok = BertWordPieceTokenizer(vocab)
    expected = [s for _, sentences in DOCS for s in sentences]
    assert [x.tolist() for x in ds[:]] == [tok.tokenize(s) for s in expected]
    assert ds.document_indices.tolist() == [0, 4, 4, 5, 8, 10]  # documents are groups of sentences
    assert ds.dtype == np.uint16


ORACLE = r"""
import json, numpy, torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
ds = IndexedDataset("ours")
out = {"tokens": [ds[i].tolist() for i in range(len(ds))], "documents": ds.document_indices.tolist(),
       "lengths": ds.sequence_lengths.tolist()}
spec = json.load(open("sentences.json"))
b = IndexedDatasetBuilder("theirs.bin", dtype=numpy.uint16)
for document in spec:
    for sentence in document:
        b.add_item(torch.tensor(sentence, dtype=torch.int64))
    b.end_document()
b.finalize("theirs.idx")
print(json.dumps(out))
"""


def test_megatron_core_reads_it_and_writes_the_same_bytes(tmp_path, vocab):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [doc for doc, _ in DOCS])
    assert load_script("tools/preprocess_data.py").main(
        ["--input", corpus, "--output-prefix", str(tmp_path / "c"), "--split-sentences", "--punkt", "untrained",
         *bert_flags(vocab)]) == 0
    for ext in ("bin", "idx"):
        (tmp_path / f"ours.{ext}").write_bytes((tmp_path / f"c_text_sentence.{ext}").read_bytes())
    tok = BertWordPieceTokenizer(vocab)
    sentences = [[tok.tokenize(s) for s in doc_sentences] for _, doc_sentences in DOCS]
    (tmp_path / "sentences.json").write_text(json.dumps(sentences))
    theirs = run_oracle(ORACLE, cwd=tmp_path)
    assert theirs["tokens"] == [s for doc in sentences for s in doc]
    assert theirs["documents"] == [0, 4, 4, 5, 8, 10]
    assert theirs["lengths"] == [len(s) for doc in sentences for s in doc]
    for ext in ("bin", "idx"):  # megatron-core's builder, one add_item per sentence: the same bytes
        assert (tmp_path / f"theirs.{ext}").read_bytes() == (tmp_path / f"c_text_sentence.{ext}").read_bytes()


def test_worker_count_does_not_change_the_bytes_and_eod_ends_the_document(tmp_path, vocab):
    texts = [topics[k] for k in sorted(topics)[:40]]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    tool = load_script("tools/preprocess_data.py")
    for workers in (1, 3):  # the splitter (trained on the input) is pickled to the workers
        assert tool.main(["--input", corpus, "--output-prefix", str(tmp_path / f"w{workers}"), "--split-sentences",
                          "--punkt", "input", "--append-eod", "--workers", str(workers), *bert_flags(vocab)]) == 0
    for ext in ("bin", "idx"):
        one, three = (tmp_path / f"w{w}_text_sentence.{ext}" for w in (1, 3))
        assert one.read_bytes() == three.read_bytes()
    ds, tok = IndexedDataset(str(tmp_path / "w1_text_sentence")), BertWordPieceTokenizer(vocab)
    ends = ds.document_indices[1:] - 1  # last sentence of each document
    assert all(ds[int(i)][-1] == tok.eod for i in ends) and ds.num_documents == 40
    assert sum(int(np.sum(x == tok.eod)) for x in ds[:]) == 40  # and nowhere else
    assert len(ds) > 400  # sentences, not documents


@pytest.fixture
def offline(monkeypatch):
    """Any download or network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access or download attempted")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.downloader, "download", refuse, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def installed_punkt_tab(root, abbreviations):
    """An NLTK data folder holding a punkt_tab/english model that knows `abbreviations`."""
    folder = root / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    (folder / "abbrev_types.txt").write_text("".join(a + "\n" for a in abbreviations))
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (folder / name).write_text("")
    return str(root)


TEXT = "Mr. Smith went to Washington, e.g. the capital. He slept."


def run_tool(tmp_path, vocab, capsys, *extra, name="p"):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": TEXT}] * 3)
    rc = load_script("tools/preprocess_data.py").main(
        ["--input", corpus, "--output-prefix", str(tmp_path / name), "--split-sentences", *extra, *bert_flags(vocab)])
    err = capsys.readouterr().err
    if rc:
        return rc, err, None
    return rc, err, IndexedDataset(str(tmp_path / f"{name}_text_sentence"))


def test_punkt_is_offline_and_trains_on_the_input_without_nltk_data(tmp_path, vocab, capsys, offline, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])  # no punkt_tab installed anywhere
    rc, err, ds = run_tool(tmp_path, vocab, capsys)  # --punkt auto
    assert rc == 0 and "splitting sentences with Punkt trained on the first 5M characters of" in err
    assert ds.num_documents == 3 and len(ds) >= 6
    rc, err, _ = run_tool(tmp_path, vocab, capsys, "--punkt", "nltk", name="q")
    assert rc == 2 and err.startswith("error: --punkt nltk: no punkt_tab/english model in the NLTK data folders")
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.glob("q_*"))  # one line, no files


def test_installed_punkt_model_is_used_offline(tmp_path, vocab, capsys, offline, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [installed_punkt_tab(tmp_path / "nltk_data", ["mr", "e.g"])])
    tok = BertWordPieceTokenizer(vocab)
    for punkt in ("auto", "nltk"):
        rc, err, ds = run_tool(tmp_path, vocab, capsys, "--punkt", punkt)
        assert rc == 0 and "nltk's installed punkt_tab/english model" in err
        assert [x.tolist() for x in ds[:2]] == [tok.tokenize("Mr. Smith went to Washington, e.g. the capital."),
                                                tok.tokenize("He slept.")]  # the abbreviations hold
    rc, err, ds = run_tool(tmp_path, vocab, capsys, "--punkt", "untrained")
    assert rc == 0 and ds[0].tolist() == tok.tokenize("Mr.")  # no model: "Mr." ends a sentence


def test_keep_newlines_keeps_the_whitespace_after_each_sentence():
    text = "First line ends here.\nSecond one!  Third?\n\nA new paragraph. Last"
    kept = SentenceSplitter(keep_newlines=True).split(text)
    assert kept == ["First line ends here.\n", "Second one!  ", "Third?\n\n", "A new paragraph. ", "Last"]
    assert "".join(kept) == text
    assert SentenceSplitter().split(text) == [s.strip() for s in kept]
    import pickle

    assert pickle.loads(pickle.dumps(SentenceSplitter(keep_newlines=True))).split(text) == kept


def test_bert_data_end_to_end(tmp_path, capsys):
    """make_sample_corpus -> train_tokenizer --type wordpiece -> the flags it prints -> preprocess -> samples."""
    corpus = tmp_path / "sample.jsonl"
    assert load_script("tools/make_sample_corpus.py").main(["--output", str(corpus), "--max-docs", "200"]) == 0
    assert load_script("tools/train_tokenizer.py").main(["--input", str(corpus), "--vocab-size", "2000", "--type",
                                                         "wordpiece", "--output-dir", str(tmp_path / "tok")]) == 0
    printed = capsys.readouterr().out
    flags = shlex.split(printed.split("preprocess_data.py flags: ", 1)[1].strip())
    assert flags[:2] == ["--tokenizer-type", "BertWordPieceLowerCase"] and flags[-1] == "--split-sentences"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tmp_path / "tok" / "vocab.txt").read_text().split("\n")[:5] == specials
    assert load_script("tools/preprocess_data.py").main(
        ["--input", str(corpus), "--output-prefix", str(tmp_path / "bert"), *flags]) == 0
    args, _ = add_tokenizer_args(argparse.ArgumentParser()).parse_known_args(flags)
    tok = build_tokenizer(tokenizer_config_from_args(args))
    cfg = BertDatasetConfig(seq_length=128, data_path=[str(tmp_path / "bert_text_sentence")], split="98,2,0",
                            tokenizer=tok)
    train, valid, test = build_bert_datasets(cfg, [64, 8, 0])
    assert test is None and len(train) >= 64 and len(valid) >= 8
    x = train[0]
    assert x["text"][0] == tok.cls and np.sum(np.where(x["labels"] >= 0, x["labels"], x["text"]) == tok.sep) == 2
    assert (tmp_path / "cache" / "BertDataset_indices").is_dir()  # cached next to the data
