"""Global gradient norm, clipping and the inf/NaN verdict across all model-parallel ranks, on the device.

Each parameter's gradient is counted once per model replica: tensor-parallel shards on every TP rank,
replicated parameters (norms, row-parallel biases, position embeddings) only on TP rank 0, and the last
pipeline stage's copy of tied word embeddings not at all (the first stage counts them). The squares are
summed over the model-parallel group, so every rank gets the same norm and the same clip coefficient.

Nothing here reads a value on the host: the squared norm, the clip coefficient (applied with one
`_foreach_mul_` by a device scalar) and the verdict stay tensors, so the optimizer step is queued right
behind backward and the trainer reads them once per iteration, with the loss (`optimizer.py`,
docs/training.md).

The sum of squares: on CUDA `torch._foreach_norm`, a few kernels for all parameters instead of three per
parameter. On the CPU, where a kernel launch costs nothing, per-tensor `g.pow(2).sum()` added in order:
the arithmetic of the recorded runs (tests/golden), so their gradient norms stay equal bit for bit.
"""

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def counts_for_norm(p: torch.nn.Parameter) -> bool:
    if getattr(p, "shared_embedding", False):
        return False
    return getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


def _sum_of_squares(grads: List[torch.Tensor], device, foreach: Optional[bool]) -> torch.Tensor:
    """sum(g²) over all grads: [] fp32 on the device."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    if foreach is None:
        foreach = grads[0].is_cuda
    if foreach:
        return torch.stack(torch._foreach_norm([g.detach().float() for g in grads])).square().sum()  # []
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += g.detach().float().pow(2).sum()
    return sq


def grad_sum_of_squares(params: List[torch.nn.Parameter], group=None, foreach: Optional[bool] = None) -> torch.Tensor:
    """The squared global L2 norm of the gradients: [] fp32 on the device, not read. `foreach` None: on CUDA.

    The host takes the square root (`math.sqrt`, correctly rounded): torch's float64 sqrt on the CPU is
    not (it differs in the last bit for ~1 % of inputs), and the logged norm stays what it always was."""
    grads = [p.grad for p in params if p.grad is not None and counts_for_norm(p)]
    device = parallel_state.get_device() if not grads else grads[0].device
    sq = _sum_of_squares(grads, device, foreach)  # []
    if group is not None:
        dist.all_reduce(sq, group=group)
    return sq


def clip_grads_by_norm(params: List[torch.nn.Parameter], max_norm: float, group=None,
                       foreach: Optional[bool] = None) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most `max_norm`, on the device; return the squared
    norm before clipping ([] fp32, `grad_sum_of_squares`). A non-finite norm leaves the gradients as they are.

    The coefficient max_norm / (norm + 1e-6), clamped at 1 (x * 1.0 == x), rounded to fp32 as a Python
    scalar was: the same bits as the host computation unless the device's sqrt is one float64 ulp off
    right at an fp32 rounding boundary (odds ~2**-29 per step)."""
    sq = grad_sum_of_squares(params, group, foreach)  # []
    if max_norm > 0:
        norm = sq.double().sqrt()  # [] float64
        # a true division: `float / tensor` is reciprocal-then-multiply in torch, two roundings
        coeff = torch.div(norm.new_full((), max_norm), norm + 1e-6).clamp(max=1.0)  # [] float64
        coeff = torch.where(torch.isfinite(norm), coeff, torch.ones_like(coeff)).float()  # [] fp32
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], coeff)
    return sq


def any_rank_found_inf(grads: List[torch.Tensor], group: Optional[dist.ProcessGroup] = None,
                       unscale: Optional[float] = None) -> torch.Tensor:
    """1.0 when any gradient on any rank of `group` holds an inf or NaN, else 0.0: [] fp32 on the device (the
    form torch's fused Adam takes as `found_inf`). With `unscale` the gradients are first multiplied by it in
    place, in the same foreach kernel that checks them (checked before the multiply, as torch's GradScaler;
    the same verdict for any scale >= 1)."""
    device = grads[0].device if grads else parallel_state.get_device()
    found = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        inv = found.new_full((), 1.0 if unscale is None else unscale)  # [] fp32: unscale rounded as a scalar is
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
    if group is not None:
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return found
