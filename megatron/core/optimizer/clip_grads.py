"""Global gradient norm and clipping across all model-parallel ranks.

Each parameter's gradient is counted once per model replica: tensor-parallel shards on every TP rank,
replicated parameters (norms, row-parallel biases, position embeddings) only on TP rank 0, and the last
pipeline stage's copy of tied word embeddings not at all (the first stage counts them). The squares are
summed over the model-parallel group, so every rank gets the same norm and the same clip coefficient.
"""

import math
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def counts_for_norm(p: torch.nn.Parameter) -> bool:
    if getattr(p, "shared_embedding", False):
        return False
    return getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


def total_grad_norm(params: List[torch.nn.Parameter], group=None) -> float:
    grads = [p.grad for p in params if p.grad is not None and counts_for_norm(p)]
    device = parallel_state.get_device() if not grads else grads[0].device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += g.detach().float().pow(2).sum()
    if group is not None:
        dist.all_reduce(sq, group=group)
    return math.sqrt(float(sq))


def clip_grad_norm(params: List[torch.nn.Parameter], max_norm: float, group=None) -> float:
    """Scale all gradients so their global L2 norm is at most `max_norm`; return the norm before clipping."""
    norm = total_grad_norm(params, group)
    if max_norm > 0 and math.isfinite(norm):
        coeff = max_norm / (norm + 1e-6)
        if coeff < 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], coeff)
    return norm


def any_rank_found_inf(grads: List[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> bool:
    """True when any gradient on any rank of `group` holds an inf or NaN (all ranks agree)."""
    device = grads[0].device if grads else parallel_state.get_device()
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
    if group is not None:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bool(bad > 0)
