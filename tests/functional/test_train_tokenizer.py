"""tools/train_tokenizer.py end to end: sample corpus -> train -> the printed flags -> build_tokenizer."""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer

from megatron.core.tokenizer import (
    add_tokenizer_args,
    build_tokenizer,
    tokenizer_config_from_args,
)
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name):
    return load_script(f"tools/{name}.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sample.jsonl"
    assert load_tool("make_sample_corpus").main(["--output", str(path), "--max-docs", "300"]) == 0
    return path


def texts(corpus, n=50):
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def train(corpus, kind, out, capsys, vocab_size=1000):
    """Run the tool; return the tokenizer built from the flags it printed for preprocess_data.py."""
    argv = ["--input", str(corpus), "--vocab-size", str(vocab_size), "--type", kind, "--output-dir", str(out)]
    assert load_tool("train_tokenizer").main(argv) == 0
    printed = capsys.readouterr().out
    flags = printed.split("preprocess_data.py flags: ", 1)[1].strip()
    assert flags.endswith("--append-eod")
    parser = add_tokenizer_args(argparse.ArgumentParser())
    args, _ = parser.parse_known_args(shlex.split(flags))
    return build_tokenizer(tokenizer_config_from_args(args)), printed


def test_gpt2_bpe(corpus, tmp_path, capsys):
    out = tmp_path / "gpt2"
    tok, printed = train(corpus, "gpt2-bpe", out, capsys)
    assert sorted(os.listdir(out)) == ["merges.txt", "vocab.json"]
    assert f"wrote {out / 'vocab.json'}" in printed
    assert tok.vocab_size == 1000 and tok.eod == 0
    ref = ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    for text in texts(corpus) + ["unicode ☃ 日本 e\u0301 \x00\t\n"]:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text).ids and tok.detokenize(ids) == text


def test_sentencepiece(corpus, tmp_path, capsys):
    out = tmp_path / "sp"
    tok, _ = train(corpus, "sentencepiece", out, capsys)
    assert sorted(os.listdir(out)) == ["tokenizer.model", "tokenizer.vocab"]
    assert len((out / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()) == 1000
    assert tok.vocab_size == 1000 and tok.eod == 2
    for text in texts(corpus) + ["unicode ☃ 日本 e\u0301 \x00\t\n  two  spaces"]:
        assert tok.detokenize(tok.tokenize(text)) == text  # byte fallback + identity normalization


def test_small_corpus_gives_smaller_vocab(corpus, tmp_path, capsys):
    for kind in ("gpt2-bpe", "sentencepiece"):
        tok, printed = train(corpus, kind, tmp_path / kind, capsys, vocab_size=200_000)
        assert tok.vocab_size < 200_000 and "asked 200000" in printed


def test_bad_input_one_line_error_no_outputs(corpus, tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    out = tmp_path / "out"
    cases = [
        (["--input", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--input", str(bad)], "line 2 has no string under key 'text'"),
        (["--input", str(corpus), "--json-keys", "body"], "key 'body'"),
        (["--input", str(corpus), "--vocab-size", "100"], "too small for gpt2-bpe"),
        (["--input", str(corpus), "--vocab-size", "100", "--type", "sentencepiece"],
         "sentencepiece training failed"),
    ]
    for extra, message in cases:
        argv = ["--vocab-size", "500", "--type", "gpt2-bpe", "--output-dir", str(out)] + extra
        assert tool.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output folder, no temp folder


def test_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(tmp_path / "none.jsonl"),
         "--vocab-size", "500", "--type", "sentencepiece", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --input")
    assert "Traceback" not in proc.stderr
