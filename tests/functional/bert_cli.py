"""Shared pieces for running pretrain_bert_ltd.py in tests: a tiny WordPiece vocab, tiny flags, and a
synthetic, learnable BERT dataset that yields exactly the dict `megatron.core.datasets.bert_dataset` does.

The synthetic data lets the model tests run without the sentence-level corpus: `use_synthetic_data`
swaps the entry point's `build_datasets` (the only function that reads `--data-path`).
"""

import os

import numpy as np

from tests.functional.gpt_cli import read_json_lines
from tests.scripts import load_script

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [a + b for a in "bcdfghjklm" for b in "aeiou"] + [a + b + "x" for a in "bcdfghjklm" for b in "aeiou"]
NUM_WORDS = len(WORDS)  # 100 ordinary pieces, ids 5..104; vocab.txt has 105 lines, the tokenizer 107 ids

TINY = [
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "2e-3", "--min-lr", "1e-4",
    "--lr-decay-style", "linear", "--lr-warmup-iters", "2", "--tokenizer-type", "BertWordPieceLowerCase",
    "--num-workers", "0", "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "1",
    "--seed", "7", "--split", "90,10,0", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--make-vocab-size-divisible-by", "64",
]
LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "8"]


def write_vocab(directory) -> str:
    path = os.path.join(str(directory), "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(SPECIALS + WORDS) + "\n")
    return path


class SyntheticBertDataset:
    """[CLS] A [SEP] B [SEP] [PAD]...: every sample is about one of 10 topics of 10 words; A draws from the
    topic's first five words, B from its last five. So a masked word is predictable from the others
    (loss ln(10) or below, against ln(V) for a model that has learnt nothing) and the segment order from
    which half sits in segment A: with probability 1/2 the segments are swapped (`is_random` = 1, the SOP
    label). Lengths vary and a quarter of the samples are very short (mostly padding), so padding and
    random-LTD meet."""

    def __init__(self, num_samples: int, seq_length: int, seed: int = 0, binary_head: bool = True,
                 pad=0, cls=2, sep=3, mask=4, first_word=5, mask_prob=0.15):
        self.n, self.s, self.seed, self.binary_head = num_samples, seq_length, seed, binary_head
        self.pad, self.cls, self.sep, self.mask = pad, cls, sep, mask
        self.first_word, self.mask_prob = first_word, mask_prob

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        rng = np.random.RandomState((self.seed * 100003 + int(k)) % 2**32)
        s = self.s
        real = rng.randint(4, 9) if rng.rand() < 0.25 else rng.randint(s // 2, s - 2)  # tokens of A + B
        topic = self.first_word + 10 * rng.randint(10)
        cut = rng.randint(1, real) if self.binary_head else real
        a = topic + rng.randint(0, 5, size=cut)  # [cut]
        b = topic + rng.randint(5, 10, size=real - cut)  # [real - cut]
        swapped = self.binary_head and rng.rand() < 0.5
        if swapped:
            a, b = b, a
        text = np.concatenate([[self.cls], a, [self.sep]] + ([b, [self.sep]] if self.binary_head else []))
        types = np.concatenate([np.zeros(len(a) + 2), np.ones(len(text) - len(a) - 2)])
        n = len(text)
        labels = np.full(s, -1, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        candidates = [i for i in range(n) if text[i] not in (self.cls, self.sep)]
        chosen = rng.choice(candidates, size=max(1, int(round(self.mask_prob * len(candidates)))), replace=False)
        tokens = np.full(s, self.pad, dtype=np.int64)
        tokens[:n] = text
        for i in chosen:
            labels[i], loss_mask[i] = tokens[i], 1.0
            u = rng.rand()
            if u < 0.8:
                tokens[i] = self.mask
            elif u < 0.9:
                tokens[i] = self.first_word + rng.randint(NUM_WORDS)
        padding_mask = np.arange(s) >= n
        return {"text": tokens, "types": np.pad(types, (0, s - n)).astype(np.int64), "labels": labels,
                "loss_mask": loss_mask, "padding_mask": padding_mask, "is_random": np.int64(swapped)}


def load_entry():
    return load_script("pretrain_bert_ltd.py")


def use_synthetic_data(monkeypatch):
    """Make pretrain_bert_ltd.py train on `SyntheticBertDataset` (train/valid/test of the asked sizes)."""
    entry = load_entry()

    def build(config, bert, tokenizer, num_samples):
        return tuple(SyntheticBertDataset(max(n, 1), config.model.seq_length, seed=i, binary_head=bert.binary_head,
                                          pad=tokenizer.pad, cls=tokenizer.cls, sep=tokenizer.sep,
                                          mask=tokenizer.mask) if n else None
                     for i, n in enumerate(num_samples))

    monkeypatch.setattr(entry, "build_datasets", build)
    return entry


def run_inprocess(argv):
    from megatron.training.cli import run_cli

    return run_cli(load_entry().main, argv)


def train_records(path):
    return [r for r in read_json_lines(path) if "lm_loss" in r]
