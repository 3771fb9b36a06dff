"""GLUE sentence-pair files (tab-separated, header row, no quoting) and the dataset the classifier reads.

Columns are found by their header names, so both the train and dev layouts of a task read the same way:

    MNLI  train.tsv / dev_matched.tsv / dev_mismatched.tsv   sentence1, sentence2, gold_label
          labels contradiction, entailment, neutral -> 0, 1, 2
    QQP   train.tsv / dev.tsv                                question1, question2, is_duplicate
          labels 0, 1

The GLUE test files carry no labels and are refused (accuracy needs them). A row with fewer fields than
the header (QQP's train file has a few broken lines) is skipped and counted; an unknown label is an
error naming the line.

Each sample: `[CLS] a [SEP] b [SEP] [PAD]...`, the longer of a/b cut first until it fits `seq_length`;
token types 0 up to the first [SEP], 1 after; `padding_mask` True on [PAD] (the pretraining contract).
"""

import csv
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from megatron.core.errors import UserError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # some GLUE fields are longer than csv's default limit


@dataclass(frozen=True)
class PairTask:
    text_a: str
    text_b: str
    label: str
    labels: Tuple[str, ...]  # index = class id


TASKS: Dict[str, PairTask] = {
    "MNLI": PairTask("sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral")),
    "QQP": PairTask("question1", "question2", "is_duplicate", ("0", "1")),
}


def read_pairs(path: str, task: str) -> Tuple[List[Tuple[str, str, int]], int]:
    """[(text_a, text_b, label id)] of a labelled GLUE file, and how many malformed rows were skipped."""
    spec = TASKS[task]
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows, None)
            if header is None:
                raise UserError(f"{path} is empty; pass a {task} TSV file with a header row")
            missing = [c for c in (spec.text_a, spec.text_b, spec.label) if c not in header]
            if missing:
                raise UserError(f"{path} has no column {', '.join(missing)} in its header; a labelled {task} file "
                                f"(train or dev TSV) needs {spec.text_a}, {spec.text_b}, {spec.label}")
            ia, ib, il = (header.index(c) for c in (spec.text_a, spec.text_b, spec.label))
            ids = {name: i for i, name in enumerate(spec.labels)}
            pairs, skipped = [], 0
            for line, row in enumerate(rows, start=2):
                if len(row) < len(header):
                    skipped += 1
                    continue
                if row[il] not in ids:
                    raise UserError(f"{path} line {line}: label {row[il]!r} is not one of {', '.join(spec.labels)} "
                                    f"({task})")
                pairs.append((row[ia], row[ib], ids[row[il]]))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass a {task} TSV file")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason})")
    if not pairs:
        raise UserError(f"{path} holds no usable {task} rows")
    return pairs, skipped


class PairDataset:
    """Tokenized pairs, padded to `seq_length`, stored compactly; `batch(idx)` gives tensors."""

    def __init__(self, pairs: List[Tuple[str, str, int]], tokenizer, seq_length: int):
        if seq_length < 4:
            raise UserError(f"--seq-length {seq_length} is too short for [CLS] a [SEP] b [SEP]")
        n = len(pairs)
        self.text = np.full((n, seq_length), tokenizer.pad, dtype=np.int32)  # [N, s]
        self.types = np.zeros((n, seq_length), dtype=np.int8)  # [N, s]
        self.length = np.zeros(n, dtype=np.int32)  # [N] real tokens
        self.label = np.array([p[2] for p in pairs], dtype=np.int64)  # [N]
        cls, sep = tokenizer.cls, tokenizer.sep
        for i, (a, b, _) in enumerate(pairs):
            a, b = truncate_pair(tokenizer.tokenize(a), tokenizer.tokenize(b), seq_length - 3)
            ids = [cls, *a, sep, *b, sep]
            self.text[i, :len(ids)] = ids
            self.types[i, len(a) + 2:len(ids)] = 1
            self.length[i] = len(ids)

    def __len__(self) -> int:
        return len(self.label)

    def batch(self, idx: np.ndarray) -> dict:
        """Samples `idx` [b] as tensors: text, types [b, s] int64; padding_mask [b, s] bool; label [b]."""
        s = self.text.shape[1]
        return {"text": torch.from_numpy(self.text[idx].astype(np.int64)),
                "types": torch.from_numpy(self.types[idx].astype(np.int64)),
                "padding_mask": torch.from_numpy(np.arange(s)[None, :] >= self.length[idx][:, None]),
                "label": torch.from_numpy(self.label[idx])}


def truncate_pair(a: List[int], b: List[int], budget: int) -> Tuple[List[int], List[int]]:
    """Drop tokens from the end of the longer segment until both fit in `budget` tokens."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b
