"""Which dataset indices each data-parallel rank reads, in Megatron's order, with exact resume.

Samples are consumed in dataset order 0, 1, 2, ... (the dataset itself is already shuffled). The
stream is cut into chunks of `mbs * dp`; in each chunk DP rank d takes `[d * mbs, (d + 1) * mbs)`.
A global batch is `num_microbatches` consecutive chunks, so with `gbs = mbs * dp * M`:

    micro-batch m (0 <= m < M) of DP rank d covers global-batch positions [(m * dp + d) * mbs, + mbs)

Position p in the global batch is the p-th sample consumed in it. Random-LTD keys its per-sample
random draws on this position (not on the rank), so a run drops the same tokens for the same sample
whatever the DP size. Resuming from `consumed_samples` (always a multiple of gbs at a checkpoint)
continues the exact sequence.
"""

from typing import Iterator, List

import numpy as np


def global_sample_offsets(
    microbatch: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int
) -> np.ndarray:
    """Global-batch positions [mbs] int64 of the samples in micro-batch `microbatch` of this rank."""
    assert 0 <= data_parallel_rank < data_parallel_size
    start = (microbatch * data_parallel_size + data_parallel_rank) * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)


class PretrainingSampler:
    """Yields this DP rank's micro-batches of dataset indices, from `consumed_samples` on.

    Like Megatron's MegatronPretrainingSampler with drop_last: a trailing chunk smaller than
    `mbs * dp` is not served. Random-LTD's plan (`random_ltd.plan`) derives each served sample's position in
    its global batch from `global_sample_offsets`.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        assert total_samples > 0, f"no samples to draw from (total_samples={total_samples})"
        assert 0 <= consumed_samples < total_samples, (
            f"consumed_samples {consumed_samples} is not below total_samples {total_samples}"
        )
        assert micro_batch_size > 0 and data_parallel_size > 0
        assert 0 <= data_parallel_rank < data_parallel_size
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        """This rank's indices in each full chunk."""
        mbs, dp = self.micro_batch_size, self.data_parallel_size
        chunk = mbs * dp
        lo = self.data_parallel_rank * mbs
        for start in range(self.consumed_samples, self.total_samples - chunk + 1, chunk):
            yield list(range(start + lo, start + lo + mbs))
