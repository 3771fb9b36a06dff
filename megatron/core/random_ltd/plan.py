"""Random-LTD for the micro-batches of an iteration: what the trainer hands the model with each batch.

    plan = RandomLTDPlan(seed, schedule, layers, micro_batch_size, data_parallel_rank, data_parallel_size)
    plan.kept_length(t)                       # r_t
    batch["ltd"] = plan.for_micro_batch(t, m, device)   # a RandomLTDState, or None when nothing drops

The key of every draw is (seed, t, global sample index, layer). A sample's global index is its position in
the global batch, which the sampler's order fixes (`datasets.samplers.global_sample_offsets`): micro-batch m
of DP rank d holds positions [(m * dp + d) * b, + b). So the plan needs only this rank's place in the data
parallel group, and every layout, micro-batch split and recomputation draws the same tokens.

Glossary: b micro batch, t 0-based iteration (completed optimizer steps), m micro-batch of the iteration.
"""

from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

from megatron.core.datasets.samplers import global_sample_offsets
from megatron.core.random_ltd.routing import RandomLTDState
from megatron.core.random_ltd.schedule import MSLGSchedule


@dataclass(frozen=True)
class RandomLTDPlan:
    seed: int
    seq_length: int  # s
    schedule: Optional[MSLGSchedule]  # None: random-LTD is off, r_t = s
    layers: FrozenSet[int]  # the global LTD layers this pipeline stage runs (a layer's draw needs no other)
    micro_batch_size: int  # b
    data_parallel_rank: int
    data_parallel_size: int

    def kept_length(self, iteration: int) -> int:
        """r_t: tokens each LTD layer keeps per sample at 0-based iteration t (s when random-LTD is off)."""
        return self.seq_length if self.schedule is None else self.schedule.kept_length(iteration)

    def for_micro_batch(self, iteration: int, micro_batch: int, device) -> Optional[RandomLTDState]:
        """The state the model drops tokens by in micro-batch m of iteration t; None when this stage has no
        LTD layer (the block then runs every layer on all tokens, as in evaluation)."""
        if not self.layers:
            return None
        ids = global_sample_offsets(micro_batch, self.micro_batch_size, self.data_parallel_rank,
                                    self.data_parallel_size)  # [b] positions in the global batch
        return RandomLTDState(self.seed, iteration, torch.from_numpy(ids).to(device), self.kept_length(iteration),
                              self.layers)
