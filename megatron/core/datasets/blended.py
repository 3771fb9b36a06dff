"""Mixing several datasets by weight, sample by sample, as Megatron does.

Sample i of the blend comes from the dataset whose count lags its share the most: the largest error
`w_d * max(i, 1) - count_d` (first dataset on ties). Dataset d serves its own samples in order, so the
blend is deterministic and every part is read without repetition up to its share. The two index arrays
match Megatron-LM's `build_blending_indices` bit for bit and are cached like the GPT indices:

    dataset_index        [size] int16   which dataset serves blend sample i
    dataset_sample_index [size] int64   which sample of that dataset
"""

import array
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from megatron.core.datasets.gpt_dataset import SPLIT_NAMES, cached_arrays, describe
from megatron.core.errors import UserError

_BLEND_SURPLUS = 0.005  # each blended part builds 0.5% more samples than its share (Megatron's margin)


def blending_indices(weights: Sequence[float], size: int) -> Dict[str, np.ndarray]:
    """Greedy largest-error assignment of `size` samples to datasets with normalized `weights`."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    which = array.array("h")
    sample = array.array("q")
    for i in range(size):
        x = float(max(i, 1))
        best, best_error = 0, w[0] * x - counts[0]
        for d in range(1, len(w)):
            error = w[d] * x - counts[d]
            if error > best_error:
                best, best_error = d, error
        which.append(best)
        sample.append(counts[best])
        counts[best] += 1
    return _as_arrays(which, sample)


def exhaustive_blending_indices(sizes: Sequence[int]) -> Dict[str, np.ndarray]:
    """Like `blending_indices` with weights sizes/sum, but dataset d stops after exactly sizes[d]."""
    total = sum(sizes)
    w = [n / float(total) for n in sizes]
    counts = [0] * len(sizes)
    open_ = [d for d in range(len(sizes)) if sizes[d] > 0]
    which = array.array("h")
    sample = array.array("q")
    for i in range(total):
        x = float(max(i, 1))
        best, best_error = -1, -float("inf")
        for d in open_:
            error = w[d] * x - counts[d]
            if error > best_error:
                best, best_error = d, error
        which.append(best)
        sample.append(counts[best])
        counts[best] += 1
        if counts[best] == sizes[best]:
            open_.remove(best)
    return _as_arrays(which, sample)


def _as_arrays(which: array.array, sample: array.array) -> Dict[str, np.ndarray]:
    return {
        "dataset_index": np.array(which, dtype=np.int16),
        "dataset_sample_index": np.array(sample, dtype=np.int64),
    }


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights`.

    weights: any positive numbers (normalized here). size None: every sample of every dataset exactly
    once, with `weights` the integer sample counts. `ds[k]` returns the chosen dataset's sample dict.
    """

    def __init__(
        self,
        datasets: List,
        weights: Sequence[float],
        size: Optional[int],
        cache_dir: Optional[str] = None,
        split_name: str = "train",
    ) -> None:
        assert len(datasets) == len(weights) and 0 < len(datasets) < 32767
        assert all(w > 0 for w in weights), "blend weights must be positive"
        if size is not None:
            weights = (np.array(weights, dtype=np.float64) / np.sum(weights)).tolist()
        else:
            assert all(int(w) == w for w in weights), "without a size, weights are sample counts"
            weights = [int(w) for w in weights]
        self.datasets = datasets
        self.weights = weights
        self.size = size
        self.split_name = split_name
        self.description = {
            "class": type(self).__name__,
            "datasets": [getattr(d, "description", type(d).__name__) for d in datasets],
            "split": split_name,
            "weights": weights,
            "size": size,
        }
        text, md5 = describe(self.description)
        if size is None:
            build = lambda: exhaustive_blending_indices(weights)  # noqa: E731
        else:
            build = lambda: blending_indices(weights, size)  # noqa: E731
        names = ("dataset_index", "dataset_sample_index")
        arrays = cached_arrays(cache_dir, f"{md5}-BlendedDataset-{split_name}", text, names, build)
        self.dataset_index = arrays["dataset_index"]  # [size] int16
        self.dataset_sample_index = arrays["dataset_sample_index"]  # [size] int64
        used = np.bincount(np.asarray(self.dataset_index), minlength=len(datasets))
        for d, n in enumerate(used):
            assert n <= len(datasets[d]), (
                f"the blend takes {n} samples from part {d}, which has {len(datasets[d])}"
            )

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def __getitem__(self, k: int) -> Dict[str, np.ndarray]:
        d = int(self.dataset_index[k])
        return self.datasets[d][int(self.dataset_sample_index[k])]


def build_blended_splits(
    prefixes: Sequence[str],
    weights: Optional[Sequence[float]],
    sizes: Sequence[Optional[int]],
    split_matrix: Sequence,
    build_splits: Callable[[int, Sequence[Optional[int]]], list],
    cache_dir: Optional[str],
    too_short: str,
) -> tuple:
    """(train, valid, test) BlendedDatasets over several prefixes (GPT and BERT alike).

    `build_splits(k, part_sizes)` returns prefix k's three datasets (None where a split is off or empty).
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
        parts = [build_splits(k, b) for k, b in enumerate(buffers)]
    else:
        one_epoch = [None if size else 0 for size in sizes]
        parts = [build_splits(k, one_epoch) for k in range(len(prefixes))]

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
