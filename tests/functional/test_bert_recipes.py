"""The BERT-large recipes are the very scripts users launch; here they run through torchrun on CPU, shrunk
by their environment variables, on real sentence-split WordPiece data (tools/preprocess_data.py)."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.functional import bert_cli
from tests.functional.gpt_cli import REPO, read_json_lines

TINY_ENV = dict(NUM_LAYERS="4", HIDDEN="32", HEADS="4", SEQ="32", GLOBAL_BATCH="4", MICRO_BATCH="2",
                GPUS_PER_NODE="1", TRAIN_ITERS="8", WARMUP_ITERS="2", PRECISION="", LOG_INTERVAL="1",
                EVAL_INTERVAL="4", EVAL_ITERS="1", SAVE_INTERVAL="100",
                EXTRA_ARGS="--num-workers 0 --distributed-backend gloo")
S, R0, Q, T_RAMP = 32, 8, 4, 6  # SEQ, LTD_START, LTD_STEP, LTD_RAMP_ITERS of the ltd run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """600 documents of 6 sentences -> `corpus_text_sentence` (the recipes' --split 949,50,1 gives the
    test split round(0.001 * 600) = 1 document), and the WordPiece vocab it was tokenized with."""
    root = tmp_path_factory.mktemp("bert_recipe_data")
    vocab = bert_cli.write_vocab(root)
    words = bert_cli.WORDS
    with open(root / "corpus.jsonl", "w") as f:
        for d in range(600):
            sentences = [" ".join(words[(d * 7 + s * 3 + w) % len(words)] for w in range(5 + s % 4)) + "."
                         for s in range(6)]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input",
                           str(root / "corpus.jsonl"), "--output-prefix", str(root / "corpus"), "--tokenizer-type",
                           "BertWordPieceLowerCase", "--vocab-file", vocab, "--split-sentences", "--workers", "1",
                           "--no-progress-bar"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(root / "corpus_text_sentence"), vocab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recipe(script, corpus, tmp_path, **env):
    data, vocab = corpus
    full = {**os.environ, **TINY_ENV, "DATA_PATH": data, "VOCAB_FILE": vocab, "OUT": str(tmp_path / "run"),
            "MASTER_PORT": str(free_port()), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHON": sys.executable, **env}
    full["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full.get("PATH", "")  # torchrun of this venv
    full.pop("WORLD_SIZE", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", script)], env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    return proc, [r for r in records if "lm_loss" in r], [r for r in records if "val_loss" in r]


def check_run(proc, train, valid, tmp_path):
    """What both recipes must give: every BERT metric, fp32 (PRECISION=""), validation, a checkpoint."""
    assert re.search(r"^  bf16 \.+ False$", proc.stdout, re.M), proc.stdout[:3000]
    assert [r["iteration"] for r in train] == list(range(1, 9))
    for r in train:
        assert {"lm_loss", "sop_loss", "mlm_accuracy", "sop_accuracy"} <= set(r), sorted(r)
        assert 0.0 <= r["mlm_accuracy"] <= 1.0 and 0.0 <= r["sop_accuracy"] <= 1.0
    assert [r["iteration"] for r in valid] == [4, 8] and all("val_sop_loss" in r for r in valid)
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert (ckpt / "iter_0000008" / ".metadata").is_file()  # torch_dist, the default format


def test_ltd_recipe_runs_shrunk(corpus, tmp_path):
    proc, train, valid = run_recipe("pretrain_bert_large_ltd.sh", corpus, tmp_path, LTD_START=str(R0),
                                    LTD_STEP=str(Q), LTD_RAMP_ITERS=str(T_RAMP))
    check_run(proc, train, valid, tmp_path)
    # MSLG: r_t = min(s, q * floor((r0 + t / T * (s - r0)) / q)), t = 0-based iteration
    mslg = [min(S, Q * ((R0 * T_RAMP + t * (S - R0)) // (T_RAMP * Q))) for t in range(8)]
    assert mslg == [8, 12, 16, 20, 24, 28, 32, 32]  # the formula, worked by hand
    assert [r["kept_length"] for r in train] == mslg
    # Layers 1 and 2 of 4 drop: per sample 2 * s + 2 * r_t layer-tokens, 4 samples per iteration.
    assert train[-1]["consumed_layer_tokens"] == sum(4 * (2 * S + 2 * r) for r in mslg)


def test_baseline_recipe_runs_shrunk(corpus, tmp_path):
    proc, train, valid = run_recipe("pretrain_bert_large_baseline.sh", corpus, tmp_path)
    check_run(proc, train, valid, tmp_path)
    assert all(r["kept_length"] == S for r in train)
    assert train[-1]["consumed_layer_tokens"] == 8 * 4 * 4 * S
