"""Bad input to pretrain_gpt_ltd.py: one clear `error:` line, exit 2, no traceback, no output files."""

import os

import pytest

from tests.functional.gpt_cli import TINY, make_pattern_data, run_subprocess

REAL_DATA = [a for a in TINY if a != "--mock-data"] + ["--train-iters", "4", "--split", "90,10,0"]


def corrupt_magic(prefix):
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTMAGIC!")


def corrupt_version(prefix):
    with open(prefix + ".idx", "r+b") as f:
        f.seek(9)
        f.write((7).to_bytes(8, "little"))


def truncate_bin(prefix):
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("case, damage, extra, needle", [
    ("missing prefix", None, ["--data-path", "/nonexistent/corpus_text_document"], "corpus_text_document"),
    ("wrong magic", corrupt_magic, [], "magic"),
    ("wrong version", corrupt_version, [], "version"),
    ("short bin", truncate_bin, [], ".bin"),
    ("ids beyond vocab", None, ["--vocab-size", "40"], "another tokenizer"),
    ("missing tokenizer", None, ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "/nope/vocab.json",
                                 "--merge-file", "/nope/merges.txt"], "/nope/"),
])
def test_bad_input(tmp_path, case, damage, extra, needle):
    (tmp_path / "data").mkdir()
    prefix = make_pattern_data(tmp_path / "data")
    if damage:
        damage(prefix)
    out = tmp_path / "out"
    argv = REAL_DATA + ["--data-path", prefix] + extra + [
        "--save", str(out / "ckpt"), "--log-json", str(out / "m.jsonl"), "--tensorboard-dir", str(out / "tb")]
    proc = run_subprocess(argv)
    assert proc.returncode == 2, (case, proc.stdout[-2000:], proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, proc.stderr)
    assert needle in lines[0], (case, lines[0])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists(), f"{case}: left {os.listdir(out)}"
    data = sorted(os.listdir(tmp_path / "data"))  # no index cache, no token-range cache, no folder
    assert data == ["pattern_text_document.bin", "pattern_text_document.idx"], (case, data)


@pytest.mark.parametrize("flags, needle", [
    (["--group-query-attention", "--num-query-groups", "3"],
     "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (["--num-query-groups", "2"], "--num-query-groups needs --group-query-attention"),
    (["--group-query-attention", "--num-query-groups", "0"], "--num-query-groups must be positive"),
    (["--position-embedding-type", "rope", "--rotary-percent", "1.5"], "--rotary-percent must be in (0, 1]"),
], ids=["groups-not-dividing-heads", "groups-without-gqa", "zero-groups", "rotary-percent"])
def test_bad_attention_flags(tmp_path, flags, needle):
    out = tmp_path / "out"
    proc = run_subprocess(TINY + ["--train-iters", "2", "--save", str(out)] + flags)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0] and not out.exists(), lines[0]
