"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

Gathering `[b, s, V]` logits would cost a full-vocabulary tensor per rank; instead each rank works on its
shard `[b, s, V/tp]` and three all-reduces of `[b, s]` tensors supply what the loss needs:

    m       = max over all ranks of the row max                 (all-reduce MAX; for a stable exp)
    z_t     = logit of the target minus m, from its owning rank (all-reduce SUM; other ranks add 0)
    sum_exp = sum over all ranks of sum(exp(logits - m))        (all-reduce SUM)
    loss    = log(sum_exp) - z_t                                  [b, s]

Backward needs no communication: d loss / d logits = softmax - onehot(target), and each rank owns both
its slice of the softmax and, if the target is in its range, the one hot entry.

Computed in fp32 whatever the logits' dtype. With tp == 1 it is `F.cross_entropy(reduction='none')`.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss from vocab-sharded fp32 logits with three all-reduces over the TP group.
    Backward: (softmax - onehot) on the local shard times the incoming gradient; no communication."""

    @staticmethod
    def forward(ctx, logits, target):  # logits: [..., V/tp] fp32, target: [...]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()

        def all_reduce(t, op=dist.ReduceOp.SUM):
            if tp > 1:
                dist.all_reduce(t, op=op, group=group)
            return t

        row_max = all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)  # [...]
        shifted = logits - row_max.unsqueeze(-1)  # [..., V/tp], a new tensor: the caller's logits stay intact

        v_local = logits.shape[-1]
        start = rank * v_local
        foreign = (target < start) | (target >= start + v_local)  # [...], target owned by another rank
        local_target = (target - start).masked_fill(foreign, 0)  # [...]
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # [...]
        target_logit = all_reduce(target_logit.masked_fill(foreign, 0.0))  # [...]

        exp = shifted.exp_()  # [..., V/tp], in place on our own copy
        sum_exp = all_reduce(exp.sum(dim=-1))  # [...]
        loss = sum_exp.log() - target_logit  # [...]

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # [..., V/tp]
        ctx.save_for_backward(softmax, local_target, foreign)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # grad_loss: [...]
        softmax, local_target, foreign = ctx.saved_tensors
        grad = softmax  # [..., V/tp], in place as in Megatron: the saved softmax is not needed after this
        onehot = (~foreign).to(grad.dtype).unsqueeze(-1)  # [..., 1], 1 where this rank owns the target
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        return grad.mul_(grad_loss.unsqueeze(-1)), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss, fp32: logits [..., V/tp] (this rank's vocabulary shard), target [...] global ids -> [...].

    With one tensor-parallel rank the whole vocabulary is here and torch's fused log-softmax + NLL does the
    same arithmetic in fewer passes over the [..., V] logits (the biggest tensor of a small model's step).
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        flat = logits.float().reshape(-1, logits.shape[-1])  # [n, V]
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)  # [...]
    return _VocabParallelCrossEntropy.apply(logits.float(), target)


@torch.no_grad()
def vocab_parallel_top1_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Whether the target has the largest logit, from vocab-sharded logits [..., V/tp] -> bool [...].

    For accuracy metrics without gathering the logits: two all-reduces of [...] tensors (row max, target
    logit). A tie with the target counts as correct.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    v_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    row_max = logits.max(dim=-1).values.float()  # [...]
    foreign = (target < start) | (target >= start + v_local)  # [...]
    local_target = (target - start).masked_fill(foreign, 0)  # [...]
    target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float().masked_fill(foreign, 0.0)
    if tp > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(target_logit, group=group)
    return target_logit >= row_max  # [...]
