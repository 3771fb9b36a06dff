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

Under sequence parallelism (`sequence_parallel_size` tp > 1) the plan also works out, on the host, each LTD
layer's route of kept tokens between the TP ranks (`sequence_parallel.kept_token_routes_host`: which rows go
where and the all-to-all split sizes). Computed on the device, the route's boolean selections and split
sizes would each wait for the device, 2·tp times per LTD layer and micro-batch; here they cost nothing on
the critical path and travel with the indices in the same single copy.

Glossary: b micro batch, t 0-based iteration (completed optimizer steps), m micro-batch of the iteration,
M micro-batches per iteration, n LTD layers of this stage, r kept tokens.
"""

from dataclasses import dataclass, replace
from typing import Dict, FrozenSet, List, Optional

import numpy as np
import torch

from megatron.core.datasets.samplers import global_sample_offsets
from megatron.core.random_ltd.routing import RandomLTDState
from megatron.core.random_ltd.sampler import kept_indices_host
from megatron.core.random_ltd.sequence_parallel import KeptTokenRoute, kept_token_routes_host
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
    sequence_parallel_size: int = 1  # tp under --sequence-parallel, else 1: no routes to prepare
    tensor_parallel_rank: int = 0

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
        kept = kept.view(len(self.layers), num_micro_batches, b, r)  # [n, M, b, r] int32, on the host
        routes = self._routes(kept)  # [M] of {layer: route} with host tensors, or None
        flat = [kept.reshape(-1)] + ([] if routes is None else [t for rm in routes for rt in rm.values()
                                                                for t in _route_tensors(rt)])
        sizes = [x.numel() for x in flat]
        buffer = torch.cat([x.to(torch.int32) for x in flat])  # one transfer for indices and routes
        if torch.device(device).type == "cuda":
            buffer = buffer.pin_memory()  # a non_blocking copy from pageable memory would wait for the device
        parts = iter(buffer.to(device, non_blocking=True).split(sizes))
        kept = next(parts).view(len(self.layers), num_micro_batches, b, r)  # [n, M, b, r] int32
        for m, state in enumerate(states):
            on_device = None if routes is None else {
                layer: _with_tensors(rt, [next(parts) for _ in _ROUTE_TENSORS]) for layer, rt in routes[m].items()}
            state.preload(s, kept[:, m], on_device)  # [n, b, r] int32
        return states

    def _routes(self, kept: torch.Tensor) -> Optional[List[Dict[int, KeptTokenRoute]]]:
        """Each micro-batch's sequence-parallel route for each LTD layer, from the host indices kept
        [n, M, b, r]; None without sequence parallelism."""
        tp = self.sequence_parallel_size
        if tp == 1:
            return None
        n, M, b, r = kept.shape
        routes = kept_token_routes_host(kept.numpy().reshape(n * M, b, r), self.seq_length, tp,
                                        self.tensor_parallel_rank)  # [n·M], layer-major
        order = sorted(self.layers)
        return [{layer: routes[i * M + m] for i, layer in enumerate(order)} for m in range(M)]


_ROUTE_TENSORS = ("send_sample", "send_local", "recv_slot")  # KeptTokenRoute's index tensors


def _route_tensors(route: KeptTokenRoute) -> List[torch.Tensor]:
    return [getattr(route, name) for name in _ROUTE_TENSORS]


def _with_tensors(route: KeptTokenRoute, tensors: List[torch.Tensor]) -> KeptTokenRoute:
    """The route with its index tensors replaced by their device copies (int32; split sizes stay host ints)."""
    return replace(route, **dict(zip(_ROUTE_TENSORS, tensors)))
