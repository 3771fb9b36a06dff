"""The numbers of a step: loss_fn metrics reduced over micro-batches and data-parallel ranks, and what the
log line accumulates between two lines.

A loss_fn metric is a tensor (a mean: averaged over this rank's micro-batches, then over the data-parallel
group, Megatron's way for losses) or a (numerator, denominator) pair (a ratio of totals: both summed over
micro-batches and ranks, divided once, 0 when nothing was counted; so BERT's MLM accuracy weighs every
predicted token alike and a micro-batch without one does not count as 0).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps


def mean_metrics(metrics: List[dict]) -> Dict[str, float]:
    """{name: value} for every metric loss_fn returned ("lm loss", BERT's "sop loss", ...); {} off the last
    pipeline stage (it has no metrics)."""
    out = {}
    for name in metrics[0] if metrics else {}:
        values = [m[name] for m in metrics]
        out[name] = ratio_over_dp(values) if isinstance(values[0], tuple) else float(mean_over_dp(values))
    return out


def ratio_over_dp(pairs: list) -> float:
    """sum(numerators) / sum(denominators) over this rank's micro-batches and the data-parallel group."""
    total = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in pair])
                         for pair in pairs]).sum(0).to(ps.get_device())  # [2]
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    num, den = total.tolist()
    return num / den if den > 0 else 0.0


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
