"""tools/preprocess_data.py and tools/merge_datasets.py as a user runs them: the files they write (read
back by us and by megatron-core), worker-count independence, and one-line errors that leave no files."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from pydoc_data.topics import topics
from tokenizers import ByteLevelBPETokenizer, pre_tokenizers

from megatron.core.datasets.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron.core.tokenizer.gpt2_bpe import GPT2BPETokenizer
from tests.megatron_core_oracle import REPO, run_oracle
from tests.scripts import load_script

PREPROCESS = REPO / "tools" / "preprocess_data.py"
MERGE = REPO / "tools" / "merge_datasets.py"
NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]  # ids as text; EOD = 100

DOCS = [
    {"text": "1 2 3", "title": "7"},
    {"text": "4 5 6 7 8", "title": "8 9"},
    {"text": "", "title": "1"},  # empty: a document with no sequence, and no EOD
    {"text": ["10 11", "", "12"], "title": "2"},  # a list: one sequence per non-empty string
    {"text": "99 0", "title": "3"},
]


def load_tool(path):
    return load_script(f"tools/{path.name}")


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def run_cli(tool, *args, cwd=None):
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_writes_documents_with_eod_per_key(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli(PREPROCESS, "--input", corpus, "--output-prefix", out / "c", "--json-keys", "text", "title",
                "--append-eod", "--workers", "2", *NULL)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "c_text_document.bin", "c_text_document.idx", "c_title_document.bin", "c_title_document.idx"]

    text = IndexedDataset(str(out / "c_text_document"))
    assert text.dtype == np.uint16
    assert [x.tolist() for x in text[:]] == [[1, 2, 3, 100], [4, 5, 6, 7, 8, 100], [10, 11], [12, 100], [99, 0, 100]]
    assert text.document_indices.tolist() == [0, 1, 2, 2, 4, 5]
    title = IndexedDataset(str(out / "c_title_document"))
    assert [x.tolist() for x in title[:]] == [[7, 100], [8, 9, 100], [1, 100], [2, 100], [3, 100]]


def test_worker_count_does_not_change_the_bytes(tmp_path):
    rng = np.random.default_rng(0)
    docs = [{"text": " ".join(map(str, rng.integers(0, 100, rng.integers(0, 50))))} for _ in range(300)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    tool = load_tool(PREPROCESS)  # importable, with main(argv)
    for workers in (1, 3):
        assert tool.main(["--input", str(corpus), "--output-prefix", str(tmp_path / f"w{workers}"),
                          "--append-eod", "--workers", str(workers), "--log-interval", "100", *NULL]) == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1_text_document.{ext}").read_bytes() == (tmp_path / f"w3_text_document.{ext}").read_bytes()


def test_large_vocab_is_stored_as_int32(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "65535 69999 0"}])
    tool = load_tool(PREPROCESS)
    assert tool.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "big"),
                      "--tokenizer-type", "NullTokenizer", "--vocab-size", "70000"]) == 0
    ds = IndexedDataset(str(tmp_path / "big_text_document"))
    assert ds.dtype == np.int32 and ds[0].tolist() == [65535, 69999, 0]
    assert (tmp_path / "big_text_document.idx").read_bytes()[17] == 4  # dtype code int32


def test_gpt2_bpe_tokenizer_end_to_end(tmp_path):
    """A real tokenizer type through the CLI: a byte-level vocab with no merges (one id per byte)."""
    vocab = {sym: i for i, sym in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    texts = ["Hello, world!", "naïve café 日本"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    r = run_cli(PREPROCESS, "--input", corpus, "--output-prefix", tmp_path / "g", "--append-eod",
                "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tmp_path / "vocab.json",
                "--merge-file", tmp_path / "merges.txt")
    assert r.returncode == 0, r.stderr
    tok = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ds = IndexedDataset(str(tmp_path / "g_text_document"))
    assert [x.tolist() for x in ds[:]] == [tok.tokenize(t) + [256] for t in texts]
    assert [len(x) for x in ds[:]] == [len(t.encode()) + 1 for t in texts]  # one id per UTF-8 byte



# -- the chunked batch path: the same bytes, exact progress lines, a light start-up -----------------
def test_chunks_and_workers_write_the_per_document_bytes(tmp_path, monkeypatch, capsys):
    """Many chunks (CHUNK_BYTES shrunk), 1 and 2 workers, a trained BPE: the bytes of per-text `tokenize`
    ids written one sequence at a time with `add_item` (the path test_indexed.py checks byte for byte against
    megatron-core's writer), and `Processed` lines at exact multiples of --log-interval."""
    texts = [topics[k] for k in sorted(topics)[:60]]  # ~300 KB of English
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    values = [*texts]
    values[5], values[9] = "", [texts[9][:200], "", texts[10][:50]]  # an empty document; a list value
    lines = [json.dumps({"text": v}) for v in values]
    lines[20:20] = ["", "  "]  # blank lines are skipped, not documents
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    tok_flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "vocab.json"),
                 "--merge-file", str(tmp_path / "merges.txt")]
    tool = load_tool(PREPROCESS)
    monkeypatch.setattr(tool, "CHUNK_BYTES", 16384)  # chunks of one to a few documents
    for workers in (1, 2):
        assert tool.main(["--input", str(tmp_path / "corpus.jsonl"), "--output-prefix", str(tmp_path / f"w{workers}"),
                          "--append-eod", "--workers", str(workers), "--log-interval", "20", *tok_flags]) == 0
        assert re.findall(r"Processed (\d+) documents", capsys.readouterr().err) == ["20", "40", "60"]

    tok = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    with IndexedDatasetBuilder(str(tmp_path / "ref.bin"), np.uint16) as ref:
        for v in values:
            sequences = [ids for ids in (tok.tokenize(t) for t in (v if isinstance(v, list) else [v])) if ids]
            if sequences:
                sequences[-1] = sequences[-1] + [tok.eod]
            for ids in sequences:
                ref.add_item(np.array(ids))
            ref.end_document()
        ref.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        expected = (tmp_path / f"ref.{ext}").read_bytes()
        assert (tmp_path / f"w1_text_document.{ext}").read_bytes() == expected
        assert (tmp_path / f"w2_text_document.{ext}").read_bytes() == expected


def test_document_path_imports_neither_nltk_nor_torch(tmp_path):
    """Start-up is paid on every run: nltk (it pulls in scipy and scikit-learn, ~2 s) loads only for
    --split-sentences, and torch never."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from tests.scripts import load_script; "
            "rc = load_script('tools/preprocess_data.py').main(sys.argv[2:]); "
            "print(json.dumps([rc, sorted(m for m in ('nltk', 'scipy', 'sklearn', 'torch') if m in sys.modules)]))")
    r = subprocess.run([sys.executable, "-c", code, str(REPO), "--input", str(corpus), "--output-prefix",
                        str(tmp_path / "c"), "--append-eod", *NULL], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == [0, []]


@pytest.mark.parametrize("bad, pattern", [
    (['{"text": "7000"}', '{"text": "4" oops'], r"line 2: NullTokenizer id 7000"),  # bad id, then bad JSON
    (['{"text": "4" oops', '{"text": "7000"}'], r"line 2 is not valid JSON"),  # bad JSON, then bad id
])
def test_the_first_bad_line_of_a_chunk_is_reported(tmp_path, capsys, bad, pattern):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(['{"text": "1 2"}', *bad, '{"text": "3"}']) + "\n")  # one chunk
    assert load_tool(PREPROCESS).main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), *NULL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert not list(tmp_path.glob("c_*"))

# -- errors: one line on stderr, exit code 2, no files ----------------------------------------------
ERROR_CASES = {
    "missing input": ([], "--input .*missing.jsonl: no such file", "missing.jsonl"),
    "bad json": ([], r"corpus.jsonl line 3 is not valid JSON", None),
    "missing key": (["--json-keys", "body"], r"line 1 has no key 'body'", None),
    "tokenizer file": (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "nope.json", "--merge-file", "m.txt"],
                       "--vocab-file", None),
    "keep newlines alone": (["--keep-newlines"], "--keep-newlines only applies with --split-sentences", None),
    "bad id in a worker": (["--workers", "2"], r"line 4: NullTokenizer id 5000", None),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_error_line_and_leaves_no_files(tmp_path, case):
    extra, pattern, input_name = ERROR_CASES[case]
    lines = ['{"text": "1 2"}', '{"text": "3"}', '{"text": "4" oops', '{"text": "5000"}']
    if case == "bad id in a worker":
        lines[2] = '{"text": "4"}'
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    tokenizer = [] if "--tokenizer-type" in extra else NULL
    r = run_cli(PREPROCESS, "--input", input_name or "corpus.jsonl", "--output-prefix", out / "c", *tokenizer, *extra,
                cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert re.search(pattern, err[0]), err[0]
    assert list(out.iterdir()) == []  # not even temporaries


# -- merge_datasets --------------------------------------------------------------------------------
MERGE_ORACLE = r"""
import json, os, numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
out = {}
for prefix in ("shards/a_text_document", "shards/b_text_document", "merged"):
    ds = IndexedDataset(prefix)  # megatron-core reads what our tools wrote
    out[prefix] = {"tokens": [ds[i].tolist() for i in range(len(ds))], "documents": ds.document_indices.tolist()}
b = IndexedDatasetBuilder("theirs.bin", dtype=numpy.uint16)
for prefix in sorted(("shards/b_text_document", "shards/a_text_document")):
    b.add_index(prefix)
b.finalize("theirs.idx")
print(json.dumps(out))
"""


def test_merge_concatenates_shards_like_megatron_core(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    tool = load_tool(PREPROCESS)
    for name, docs in (("b", DOCS[2:]), ("a", DOCS[:2])):  # written out of order: merge sorts by name
        write_jsonl(tmp_path / f"{name}.jsonl", docs)
        assert tool.main(["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix", str(shards / name),
                          "--append-eod", *NULL]) == 0
    r = run_cli(MERGE, "--input", shards, "--output-prefix", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = IndexedDataset(str(tmp_path / "merged"))
    assert [x.tolist() for x in merged[:]] == [[1, 2, 3, 100], [4, 5, 6, 7, 8, 100], [10, 11], [12, 100], [99, 0, 100]]
    assert merged.document_indices.tolist() == [0, 1, 2, 2, 4, 5]

    theirs = run_oracle(MERGE_ORACLE, cwd=tmp_path)
    assert theirs["merged"]["tokens"] == [x.tolist() for x in merged[:]]
    assert theirs["merged"]["documents"] == merged.document_indices.tolist()
    assert theirs["shards/a_text_document"]["documents"] == [0, 1, 2]
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_merge_errors(tmp_path):
    tool = load_tool(MERGE)
    (tmp_path / "empty").mkdir()
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "x.bin").write_bytes(b"")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pre = load_tool(PREPROCESS)
    write_jsonl(tmp_path / "one.jsonl", [{"text": "1 2"}])
    assert pre.main(["--input", str(tmp_path / "one.jsonl"), "--output-prefix", str(mixed / "small"), *NULL]) == 0
    assert pre.main(["--input", str(tmp_path / "one.jsonl"), "--output-prefix", str(mixed / "wide"),
                     "--tokenizer-type", "NullTokenizer", "--vocab-size", "70000"]) == 0
    for folder, pattern in ((tmp_path / "nowhere", "not a folder"), (tmp_path / "empty", "no .bin/.idx pairs"),
                            (lone, "x.idx is missing"), (mixed, "same tokenizer")):
        r = run_cli(MERGE, "--input", folder, "--output-prefix", tmp_path / "m")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and pattern in r.stderr, r.stderr
        assert not list(tmp_path.glob("m.*"))
    assert tool.main(["--input", str(mixed), "--output-prefix", str(mixed / "small_text_document")]) == 2
