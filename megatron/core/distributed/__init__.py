"""Data parallelism: averaging gradients over the replicas of a model (`ddp.py`)."""

from megatron.core.distributed.ddp import DataParallelGradSync, allreduce_grads_in_group

__all__ = ["DataParallelGradSync", "allreduce_grads_in_group"]
