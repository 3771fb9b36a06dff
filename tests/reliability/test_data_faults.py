"""Data faults found at start-up, each one `error:` line before any iteration: a .bin whose size
disagrees with its .idx, token ids beyond the vocabulary (a cached once-per-file scan), an empty split,
a blend naming a missing prefix."""

import multiprocessing
import os
import time

import numpy as np
import pytest

from megatron.core.datasets import indexed
from megatron.core.datasets.indexed import IndexedDataset, IndexedDatasetBuilder, token_range
from tests.functional import bert_cli
from tests.functional.gpt_cli import make_pattern_data
from tests.reliability.common import TINY, run_inprocess

DATA = [a for a in TINY if a != "--mock-data"] + ["--train-iters", "3", "--split", "90,10,0"]


@pytest.fixture
def prefix(tmp_path):
    (tmp_path / "data").mkdir()
    return make_pattern_data(tmp_path / "data")  # ids 0..96 (96 = EOD), uint16


def start(tmp_path, capsys, prefix, *extra) -> str:
    """Run with `extra` flags; return the single error line (and check nothing was trained or written)."""
    log = tmp_path / "out" / "m.jsonl"
    assert run_inprocess(DATA + ["--data-path", prefix, "--log-json", str(log)] + list(extra)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), captured.err
    assert "iteration " not in captured.out and not (tmp_path / "out").exists()
    return err[0]


def test_bin_longer_than_its_index(tmp_path, capsys, prefix):
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\x00\x00")  # an .idx from an older, shorter run next to a newer .bin
    assert "pattern_text_document.bin is longer than" in start(tmp_path, capsys, prefix)


def test_token_ids_beyond_vocab_found_at_start_up_by_one_cached_scan(tmp_path, capsys, prefix, monkeypatch):
    line = start(tmp_path, capsys, prefix, "--vocab-size", "40")
    assert "token id 96 in" in line and "outside this tokenizer's vocab of 41" in line  # 40 + EOD
    assert not (tmp_path / "data/cache").exists()  # a failed start caches nothing
    assert run_inprocess(DATA + ["--data-path", prefix, "--eval-iters", "0"]) == 0  # vocab 97: fine, cached
    capsys.readouterr()
    cached = [n for n in os.listdir(tmp_path / "data/cache/GPTDataset_indices") if n.endswith("-token_range.json")]
    assert len(cached) == 1

    def no_scan(ds):
        raise AssertionError("scanned again although the file did not change")

    monkeypatch.setattr(indexed, "scan_token_range", no_scan)
    assert "token id 96 in" in start(tmp_path, capsys, prefix, "--vocab-size", "40")  # from the cache


def test_rewritten_bin_is_scanned_again(tmp_path, capsys, prefix):
    assert token_range(IndexedDataset(prefix), str(tmp_path / "cache")) == (0, 96)
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[5] = 500  # rewritten in place: same size, new mtime
    tokens.flush()
    del tokens
    st = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert token_range(IndexedDataset(prefix), str(tmp_path / "cache")) == (0, 500)


def test_change_that_hides_from_the_cache_key_is_caught_when_read(tmp_path, capsys, prefix):
    """Same size, inode and (restored) mtime: the cached scan says fine, the per-sample check does not."""
    assert run_inprocess(DATA + ["--data-path", prefix, "--eval-iters", "0"]) == 0
    st = os.stat(prefix + ".bin")
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[:] = np.minimum(tokens + 200, 60000)  # every id now beyond the vocabulary
    tokens.flush()
    del tokens
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_inprocess(DATA + ["--data-path", prefix, "--eval-iters", "0"]) == 2
    assert "token id 296 in" in capsys.readouterr().err


def test_empty_split(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    small = make_pattern_data(tmp_path / "data", num_docs=20)
    line = start(tmp_path, capsys, small, "--split", "99,1,0")  # 1% of 20 documents: none
    assert "the valid split of" in line and "has 0 sequences" in line and "--split weight to 0" in line


def test_blend_naming_a_missing_prefix(tmp_path, capsys, prefix):
    line = start(tmp_path, capsys, prefix, "--data-path", "0.5", prefix, "0.5", str(tmp_path / "gone_text_document"))
    assert f"{tmp_path}/gone_text_document.idx not found for data prefix" in line


def test_index_is_renamed_into_place_last(tmp_path, monkeypatch):
    """Preprocessing writes `.bin.tmp` and `.idx.tmp` and renames the `.idx` last: a reader that finds the
    new `.idx` always finds its `.bin` complete beside it."""
    renames, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((os.path.basename(src),
                                                                          os.path.basename(dst))), real(src, dst)))
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    builder.add_document([1, 2, 3], [3])
    assert not (tmp_path / "x.bin").exists()  # nothing under the real names while it is written
    builder.finalize(str(tmp_path / "x.idx"))
    assert renames == [("x.bin.tmp", "x.bin"), ("x.idx.tmp", "x.idx")]


def _token_range_after_barrier(barrier, prefix, cache, log):
    """One of two processes starting together: a scan is logged and held for a moment."""
    real = indexed.scan_token_range

    def logged_scan(ds):
        with open(log, "a") as f:
            f.write("scan\n")
        time.sleep(0.5)  # still scanning when the other process asks
        return real(ds)

    indexed.scan_token_range = logged_scan
    barrier.wait()
    with open(log + f".{os.getpid()}", "w") as f:
        f.write(repr(token_range(IndexedDataset(prefix), cache)))


def test_ranks_starting_together_scan_once(tmp_path, prefix):
    """Two processes ask for the token range at the same moment: one scans, the other waits on the lock
    and reads its cached result."""
    ctx, log = multiprocessing.get_context("fork"), str(tmp_path / "scans")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_token_range_after_barrier, args=(barrier, prefix, str(tmp_path / "cache"), log))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert open(log).read() == "scan\n"
    assert [open(f"{log}.{p.pid}").read() for p in procs] == ["(0, 96)", "(0, 96)"]


def bert_data(directory, num_docs, bad_id=None) -> str:
    """Sentence-level BERT data (4 sentences of ordinary WordPiece ids per document); with `bad_id`, one
    sentence of the middle document starts with that id."""
    rng = np.random.RandomState(0)
    prefix = os.path.join(str(directory), "bert_text_sentence")
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for d in range(num_docs):
            sentences = [[int(x) for x in rng.randint(5, 5 + bert_cli.NUM_WORDS, size=rng.randint(3, 8))]
                         for _ in range(4)]
            if bad_id is not None and d == num_docs // 2:
                sentences[1][0] = bad_id
            builder.add_document(sum(sentences, []), [len(x) for x in sentences])
        builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("num_docs, bad_id, flags, needle", [
    (20, None, ["--split", "99,1,0"], "the valid split of {prefix} has no documents (20 in all); give it more "
                                      "data or set its --split weight to 0"),
    (40, 500, [], "token id 500 in {prefix}.bin is outside this tokenizer's vocab of 107"),
], ids=["empty split", "ids beyond vocab"])
def test_bert_data_faults_at_start_up(tmp_path, capsys, num_docs, bad_id, flags, needle):
    prefix = bert_data(tmp_path, num_docs, bad_id)
    log = tmp_path / "out" / "m.jsonl"
    argv = bert_cli.TINY + ["--vocab-file", bert_cli.write_vocab(tmp_path), "--data-path", prefix,
                            "--train-iters", "3", "--log-json", str(log)] + flags
    assert bert_cli.run_inprocess(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + needle.format(prefix=prefix)), captured.err
    assert "iteration " not in captured.out and not (tmp_path / "out").exists()
