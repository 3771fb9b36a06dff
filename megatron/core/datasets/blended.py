"""Mixing several datasets by weight, sample by sample, as Megatron does.

Sample i of the blend comes from the dataset whose count lags its share the most: the largest error
`w_d * max(i, 1) - count_d` (first dataset on ties). Dataset d serves its own samples in order, so the
blend is deterministic and every part is read without repetition up to its share. The two index arrays
match Megatron-LM's `build_blending_indices` bit for bit and are cached like the GPT and BERT indices
(common.cached_arrays):

    dataset_index        [size] int16   which dataset serves blend sample i
    dataset_sample_index [size] int64   which sample of that dataset

builder.py makes the (train, valid, test) blends of a --data-path with several prefixes.
"""

import array
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron.core.datasets.common import cached_arrays, describe


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

