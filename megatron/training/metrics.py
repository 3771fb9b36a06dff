"""The numbers of a step: loss_fn metrics reduced over micro-batches and data-parallel ranks, and what the
log line accumulates between two lines.

A loss_fn metric is a tensor (a mean: averaged over this rank's micro-batches, then over the data-parallel
group, Megatron's way for losses) or a (numerator, denominator) pair (a ratio of totals: both summed over
micro-batches and ranks, divided once, 0 when nothing was counted; so BERT's MLM accuracy weighs every
predicted token alike and a micro-batch without one does not count as 0).

Nothing is read on the host per metric: `metrics_on_device` leaves the reduced values on the device and
`read_together` brings them back in one copy, with whatever else the caller reads (the trainer: the
gradient norm, the inf/NaN verdict and the stop flags; docs/training.md).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps


def mean_metrics(metrics: List[dict]) -> Dict[str, float]:
    """{name: value} for every metric loss_fn returned ("lm loss", BERT's "sop loss", ...); {} off the last
    pipeline stage (it has no metrics). One host read for all of them."""
    on_device = metrics_on_device(metrics)
    return metrics_from_host(on_device, read_together(list(on_device.values())))


def metrics_on_device(metrics: List[dict]) -> Dict[str, torch.Tensor]:
    """Each metric reduced over micro-batches and data-parallel ranks, left on the device (nothing read): a
    mean, [] fp32, or a ratio's (sum of numerators, sum of denominators), [2] float64."""
    out = {}
    for name in metrics[0] if metrics else {}:
        values = [m[name] for m in metrics]
        out[name] = totals_over_dp(values) if isinstance(values[0], tuple) else mean_over_dp(values)
    return out


def metrics_from_host(on_device: Dict[str, torch.Tensor], values: List[List[float]]) -> Dict[str, float]:
    """{name: value} from the host copies (`read_together`) of `metrics_on_device`'s tensors, in its order."""
    out = {}
    for (name, tensor), v in zip(on_device.items(), values, strict=True):
        out[name] = (v[0] / v[1] if v[1] > 0 else 0.0) if tensor.numel() == 2 else v[0]
    return out


def nonfinite_on_device(on_device: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[] bool on the device: True when a metric (a ratio's numerator or denominator) is inf or NaN."""
    if not on_device:
        return torch.zeros((), dtype=torch.bool, device=ps.get_device())
    return torch.stack([~torch.isfinite(t).all() for t in on_device.values()]).any()


def read_together(tensors: List[torch.Tensor]) -> List[List[float]]:
    """Each tensor's values on the host, in one device-to-host copy (on CUDA the one wait for the device).
    Values pass through float64, which holds fp32 and float64 values exactly."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()])
        start += t.numel()
    return out


def totals_over_dp(pairs: list) -> torch.Tensor:
    """(sum(numerators), sum(denominators)) over this rank's micro-batches and the data-parallel group:
    [2] float64 on the device."""
    total = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in pair])
                         for pair in pairs]).sum(0).to(ps.get_device())  # [2]
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total


def mean_over_dp(values: list) -> Optional[torch.Tensor]:
    """Mean of this rank's micro-batch values, averaged over the data-parallel group."""
    if not values:
        return None
    mean = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).mean().to(ps.get_device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(mean, group=ps.get_data_parallel_group())
        mean /= ps.get_data_parallel_world_size()
    return mean


def first_nonfinite_losses(losses: dict) -> dict:
    """The losses of the lowest rank whose loss is not finite (ranks off the last stage have none), so
    every rank names the same values; gathered only on the fault path, where all ranks arrive together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return losses
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses)
    bad = [g for g in gathered if g and not all(math.isfinite(v) for v in g.values())]
    return bad[0] if bad else losses


@dataclass
class LogInterval:
    """What Megatron sums between two log lines and resets after each: time, iterations, losses, and the
    skipped (fp16 overflow) and nan iterations."""

    time: float = 0.0
    iters: int = 0
    losses: Dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    nan: int = 0

    def add(self, seconds: float, losses: Dict[str, float], skipped: bool, nan: bool) -> None:
        self.time += seconds
        self.iters += 1
        self.skipped += int(skipped)
        self.nan += int(nan)
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value

    def mean_losses(self) -> Dict[str, float]:
        """{"lm_loss": ..., "sop_loss": ...}: each loss averaged over the interval, under its JSON key."""
        return {k.replace(" ", "_"): v / self.iters for k, v in self.losses.items()}
