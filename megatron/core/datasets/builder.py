"""From a dataset config to (train, valid, test), for GPT and BERT alike (Megatron's dataset builder).

The two differ only in the dataset made for one split of one prefix (`make`: GPTDataset, BertDataset) and
in the unit --split divides (GPT: sequences, BERT: documents). Everything else is here, once:

- the files are opened and their token ids checked on every rank, so a bad file fails at start-up;
- one prefix: a dataset per split over the split's contiguous range of units;
- several prefixes (a blend): per split, a BlendedDataset over one dataset per prefix;
- the index caches are built by rank 0 first and memory-mapped by the other ranks (`on_rank_0_first`).

It sits above blended.py (which caches through common.py), so common.py stays free of BlendedDataset.
"""

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from megatron.core.datasets.blended import BlendedDataset
from megatron.core.datasets.common import SPLIT_NAMES, DatasetConfig, on_rank_0_first, split_range
from megatron.core.datasets.indexed import IndexedDataset, check_token_ids
from megatron.core.errors import UserError

_BLEND_SURPLUS = 0.005  # each blended part builds 0.5% more samples than its share (Megatron's margin)

MakeSplit = Callable[[Any, Optional[str], np.ndarray, Optional[int], str, Any], Any]
"""make(indexed, prefix, ids, num_samples, split_name, config) -> the dataset of one split of one prefix:
GPTDataset's and BertDataset's constructor. `prefix` is None for data made in memory."""


def build_splits(
    config: DatasetConfig,
    num_samples: Sequence[Optional[int]],
    make: MakeSplit,
    units: Callable[[Any], int],
    vocab_size: Optional[int],
    too_short: str,
    in_memory: Any = None,
) -> tuple:
    """(train, valid, test) datasets with at least num_samples[i] samples each (None: one epoch).

    A split is None when its --split weight is 0 or it needs 0 samples. `units(indexed)` counts what
    --split divides; token ids are checked against `vocab_size` (None: no check); `too_short` ends the
    error for a blend part with no sample. `in_memory` is a corpus used instead of --data-path's files
    (GPT's mock data): nothing to open, check or cache, so every rank builds its own.
    """
    sizes = list(num_samples)
    assert len(sizes) == 3, "num_samples is (train, valid, test)"
    if in_memory is not None:
        return tuple(_prefix_splits(config, None, in_memory, sizes, make, units))
    prefixes, weights = config.blend
    indexed = [IndexedDataset(p) for p in prefixes]  # a missing or broken file fails before any work
    for x in indexed:  # ids beyond the vocabulary, found at start-up (one cached scan per file version)
        check_token_ids(x, vocab_size, config.cache_dir)

    def build() -> tuple:
        if len(prefixes) == 1 and weights is None:
            return tuple(_prefix_splits(config, prefixes[0], indexed[0], sizes, make, units))
        return build_blended_splits(
            prefixes, weights, sizes, config.split_matrix,
            lambda k, part_sizes: _prefix_splits(config, prefixes[k], indexed[k], part_sizes, make, units),
            config.cache_dir, too_short,
        )

    return on_rank_0_first(build, f"the {config.name} datasets")


def _prefix_splits(config: DatasetConfig, prefix: Optional[str], indexed, sizes: Sequence[Optional[int]],
                   make: MakeSplit, units: Callable[[Any], int]) -> list:
    """One dataset per split of one prefix (None where the split is off or needs no samples).

    An empty split that needs samples goes to `make`, whose dataset names the problem; an empty split of
    a one-epoch blend part is None, and the blend reports it.
    """
    n = units(indexed)
    out = []
    for name, bookends, size in zip(SPLIT_NAMES, config.split_matrix, sizes):
        if bookends is None or size == 0:
            out.append(None)
            continue
        beg, end = split_range(bookends, n)
        if beg == end and size is None:
            out.append(None)
            continue
        out.append(make(indexed, prefix, np.arange(beg, end), size, name, config))
    return out


def build_blended_splits(
    prefixes: Sequence[str],
    weights: Optional[Sequence[float]],
    sizes: Sequence[Optional[int]],
    split_matrix: Sequence,
    prefix_splits: Callable[[int, Sequence[Optional[int]]], list],
    cache_dir: Optional[str],
    too_short: str,
) -> tuple:
    """(train, valid, test) BlendedDatasets over several prefixes (GPT and BERT alike).

    `prefix_splits(k, part_sizes)` returns prefix k's three datasets (None where a split is off or empty).
    With weights, each part builds ceil(ceil(n * w) * 1.005) samples of a split that needs n; without,
    each part is one epoch and weighs its number of samples. `too_short` ends the error for a part with
    no sample, e.g. "shorter than one sample of 1025 tokens".
    """
    if weights is not None:
        weights = (np.array(weights, dtype=np.float64) / np.sum(weights)).tolist()
        for size in sizes:
            assert size is not None, "a weighted blend needs a sample count per split"
        targets = [[math.ceil(size * w) for size in sizes] for w in weights]  # [prefix][split]
        buffers = [[math.ceil(t * (1 + _BLEND_SURPLUS)) for t in row] for row in targets]
        parts = [prefix_splits(k, b) for k, b in enumerate(buffers)]
    else:
        one_epoch = [None if size else 0 for size in sizes]
        parts = [prefix_splits(k, one_epoch) for k in range(len(prefixes))]

    out = []
    for i, size in enumerate(sizes):
        if split_matrix[i] is None or size == 0:
            out.append(None)
            continue
        datasets = [part[i] for part in parts]
        if any(d is None for d in datasets):
            empty = prefixes[[d is None for d in datasets].index(True)]
            raise UserError(
                f"the {SPLIT_NAMES[i]} split of {empty} is empty; give it more data or set that "
                "split's --split weight to 0"
            )
        if weights is not None:
            w, n = weights, sum(row[i] for row in targets)
        else:
            w = [len(d) for d in datasets]
            if 0 in w:
                raise UserError(
                    f"the {SPLIT_NAMES[i]} split of {prefixes[w.index(0)]} is {too_short}; give it more data "
                    "or change --split"
                )
            n = None if size is None else min(size, sum(w))
        out.append(BlendedDataset(datasets, w, n, cache_dir, SPLIT_NAMES[i]))
    return tuple(out)
