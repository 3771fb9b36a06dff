"""Tensor parallelism: layers split over the TP group, the collectives between them, sharded cross entropy, RNG.

Layout: activations are batch-first `[b, s, h]`; tensor parallelism splits the last dim (`h/tp`).

    mappings.py       copy_to / reduce_from / scatter_to / gather_from, and their sequence-parallel
                      counterparts: the collectives as autograd functions
    layers.py         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    sharding.py       full parameter <-> shards (stride-aware), the divisibility check, parameter tags
    cross_entropy.py  loss over vocab-split logits without gathering them
    random.py         RNG tracker: per-rank streams for partitioned activations; activation checkpoint
"""

from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_top1_correct
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linear,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.random import (
    MODEL_PARALLEL_RNG, CheckpointFunction, RNGStatesTracker, checkpoint, get_cuda_rng_tracker, get_rng_tracker,
    model_parallel_manual_seed,
)
from megatron.core.tensor_parallel.sharding import (
    divide, full_shape, merge_shards, set_tensor_model_parallel_attributes, shard_tensor,
)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "column_parallel_linear",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "vocab_parallel_cross_entropy", "vocab_parallel_top1_correct",
    "RNGStatesTracker", "get_rng_tracker", "get_cuda_rng_tracker", "model_parallel_manual_seed",
    "MODEL_PARALLEL_RNG", "CheckpointFunction", "checkpoint",
    "shard_tensor", "merge_shards", "full_shape", "divide", "set_tensor_model_parallel_attributes",
]
