"""Shared pieces for running pretrain_gpt_ltd.py in tests: tiny flags, in-process or as a subprocess."""

import json
import os
import subprocess
import sys

from tests.scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = [
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "97", "--mock-data", "--num-workers", "0", "--log-interval", "1",
    "--eval-interval", "4", "--eval-iters", "1", "--seed", "7",
]


def load_entry(name="pretrain_gpt_ltd"):
    return load_script(f"{name}.py")


def run_inprocess(argv):
    from megatron.training.cli import run_cli

    return run_cli(load_entry().main, argv)


def run_subprocess(argv, script="pretrain_gpt_ltd.py", cwd=None):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *argv], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def assert_one_error_line(proc, needle):
    """A refused run: exit 2 and exactly one `error:` line on stderr (no traceback) that says `needle`."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_records(path):
    return [r for r in read_json_lines(path) if "lm_loss" in r]


def make_pattern_data(directory, num_docs=200, vocab=96, seed=0):
    """A learnable Megatron-format corpus: each document counts up from a random start with a random
    stride (mod `vocab`), ending in EOD = vocab. Returns the data prefix for --data-path."""
    import numpy as np

    from megatron.core.datasets.indexed import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    prefix = os.path.join(str(directory), "pattern_text_document")
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for _ in range(num_docs):
            start, stride, n = rng.randint(vocab), rng.randint(1, 4), rng.randint(20, 80)
            doc = [(start + i * stride) % vocab for i in range(n)] + [vocab]
            builder.add_document(doc, [len(doc)])
        builder.finalize(prefix + ".idx")
    return prefix
