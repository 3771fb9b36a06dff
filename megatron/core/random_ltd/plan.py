"""Random-LTD for the micro-batches of an iteration: what the trainer hands the model with each batch.

    plan = RandomLTDPlan(seed, schedule, layers, micro_batch_size, data_parallel_rank, data_parallel_size)
    plan.kept_length(t)                                    # r_t
    states = plan.for_iteration(t, num_micro, device)      # one RandomLTDState (or None) per micro-batch
    batch["ltd"] = states[m]

The key of every draw is (seed, t, global sample index, layer). A sample's global index is its position in
the global batch, which the sampler's order fixes (`datasets.samplers.global_sample_offsets`): micro-batch m
of DP rank d holds positions [(m * dp + d) * b, + b). So the plan needs only this rank's place in the data
parallel group, and every layout, micro-batch split and recomputation draws the same tokens.

Off the device's critical path: `for_iteration` draws every LTD layer of every micro-batch of the
iteration in one host call (`sampler.kept_indices_host`, bit-identical to the torch draw) and sends the
int32 result to the device in one copy, from pinned memory on CUDA so the copy is queued behind the
running kernels instead of waiting for them. The sample ids never leave the host. The trainer asks for
iteration t + 1 right after queueing step t's optimizer, while the device is still busy.

Glossary: b micro batch, t 0-based iteration (completed optimizer steps), m micro-batch of the iteration,
M micro-batches per iteration, n LTD layers of this stage, r kept tokens.
"""

from dataclasses import dataclass
from typing import FrozenSet, List, Optional

import numpy as np
import torch

from megatron.core.datasets.samplers import global_sample_offsets
from megatron.core.random_ltd.routing import RandomLTDState
from megatron.core.random_ltd.sampler import kept_indices_host
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

    def for_iteration(self, iteration: int, num_micro_batches: int, device) -> List[Optional[RandomLTDState]]:
        """The states the model drops tokens by in each micro-batch of iteration t, indices drawn and on
        their way to the device; Nones when this stage has no LTD layer (the block then runs every layer on
        all tokens, as in evaluation)."""
        if not self.layers:
            return [None] * num_micro_batches
        b, r, s = self.micro_batch_size, self.kept_length(iteration), self.seq_length
        ids = np.stack([global_sample_offsets(m, b, self.data_parallel_rank, self.data_parallel_size)
                        for m in range(num_micro_batches)])  # [M, b] positions in the global batch
        states = [RandomLTDState(self.seed, iteration, torch.from_numpy(row), r, self.layers) for row in ids]
        if r >= s:  # nothing drops this iteration
            return states
        kept = torch.from_numpy(kept_indices_host(self.seed, iteration, ids.reshape(-1), sorted(self.layers), s, r))
        if torch.device(device).type == "cuda":
            kept = kept.pin_memory()  # a non_blocking copy from pageable memory would wait for the device
        kept = kept.to(device, non_blocking=True).view(len(self.layers), num_micro_batches, b, r)  # [n, M, b, r]
        for m, state in enumerate(states):
            state.preload(s, kept[:, m])  # [n, b, r] int32
        return states
