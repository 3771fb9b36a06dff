"""tools/make_sample_corpus.py: valid JSONL, identical run to run, --max-docs, atomic, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "make_sample_corpus.py"


def load_tool():
    return load_script("tools/make_sample_corpus.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sample.jsonl"
    assert load_tool().main(["--output", str(path)]) == 0
    return path


def test_every_line_is_a_text_document(corpus):
    lines = corpus.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) > 1000 and all(isinstance(t, str) and len(t) >= 40 for t in texts)
    assert len(set(texts)) == len(texts)  # duplicates dropped
    assert corpus.stat().st_size > 1_000_000  # ~2 MB on CPython 3.11


def test_identical_across_processes_and_hash_seeds(corpus, tmp_path):
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}.jsonl"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, str(TOOL), "--output", str(out)], check=True, env=env,
                       capture_output=True)
        runs.append(out.read_bytes())
    assert runs[0] == runs[1]
    # In-process under pytest too (pytest replaces sys.unraisablehook; the tool documents the original).
    assert corpus.read_bytes() == runs[0]


def test_max_docs_is_a_prefix(corpus, tmp_path, capsys):
    out = tmp_path / "small.jsonl"
    assert load_tool().main(["--output", str(out), "--max-docs", "10"]) == 0
    small = out.read_text(encoding="utf-8").splitlines()
    assert small == corpus.read_text(encoding="utf-8").splitlines()[:10]
    assert "10 documents" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["small.jsonl"]  # no temp file left behind


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    tool = load_tool()
    for argv in (["--output", str(tmp_path / "missing" / "x.jsonl")],
                 ["--output", str(tmp_path)],
                 ["--output", str(tmp_path / "x.jsonl"), "--max-docs", "0"]):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
