"""Random-LTD under sequence parallelism: each kept token travels to the rank that owns its slot in the
kept list, the unchanged sequence-parallel layer runs there, and the outputs travel back.

Under `--sequence-parallel` TP rank c holds positions [c·s/tp, (c+1)·s/tp) of every sample. A layer that
keeps r tokens runs as the dense sequence-parallel layer on the r kept tokens, split evenly: rank c takes
entries [c·r/tp, (c+1)·r/tp) of each sample's sorted kept list ("list owner"). The layer's all-gather then
puts the whole kept sequence together in order, so causal attention and each token's original position
(RoPE, the position ids of the list) are exactly the single-process ones.

    idx  [b, r]          sorted kept positions: the same on every rank (keyed draw, nothing exchanged)
    to list owners       one all-to-all: a kept token moves from its position owner to its list owner
    layer                [b, r/tp, h] -> [b, r/tp, h], sequence parallel over the kept list
    back                 one all-to-all the other way; kept rows replaced in the chunk, others untouched

Every rank knows every other rank's kept positions, so all split sizes are computed locally; in training
the plan computes the route on the host (`plan.py`), so nothing here waits for the device. A token
whose list slot lies in its own chunk's rank does not move: only tokens displaced across a chunk boundary
travel (about √r per boundary and sample, scale.md §4.4 (d)). Norm gradients and dropout work as in any
sequence-parallel layer (local tokens, the tracker's per-rank stream, gradients summed over TP). The
design comparison is in docs/parallelism.md. Needs tp | r: the run checks that tp divides the kept-length
step (and s).

Glossary: b micro batch, s sequence, r kept tokens, h hidden, tp tensor-parallel size, c this TP rank.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps


@dataclass(frozen=True)
class KeptTokenRoute:
    """Where this rank's kept tokens go and where its list slots come from (all in row-major order of
    (sample, list entry) within each peer's block, which is what makes both sides agree)."""
    send_sample: torch.Tensor  # [n_send] sample of each row this rank sends, grouped by destination (int)
    send_local: torch.Tensor  # [n_send] its position within this rank's chunk
    send_splits: List[int]  # rows to each TP rank
    recv_slot: torch.Tensor  # [n_recv] flat slot in [b, r/tp] of each row received, grouped by source
    recv_splits: List[int]  # rows from each TP rank
    per_rank: int  # r/tp


def kept_token_route(idx: torch.Tensor, seq_length: int, tp: int, rank: int) -> KeptTokenRoute:
    """The route of kept positions idx [b, r] for TP rank `rank` of `tp` (pure function, no communication).
    Its boolean selections and split sizes read values: on a GPU call it with host indices (as the plan
    does), or each one waits for the device."""
    b, r = idx.shape
    assert seq_length % tp == 0 and r % tp == 0, f"sequence parallel LTD needs tp={tp} to divide s and r={r}"
    chunk, per = seq_length // tp, r // tp
    position_owner = idx // chunk  # [b, r]
    list_owner = (torch.arange(r, device=idx.device) // per).expand(b, r)  # [b, r]
    flat = torch.arange(b * r, device=idx.device).view(b, r)  # [b, r] row-major numbering
    sends = [flat[(position_owner == rank) & (list_owner == d)] for d in range(tp)]  # each [n_cd]
    recvs = [flat[(list_owner == rank) & (position_owner == c)] for c in range(tp)]
    send, recv = torch.cat(sends), torch.cat(recvs)  # [n_send], [n_recv]
    return KeptTokenRoute(
        send_sample=send // r, send_local=idx.reshape(-1)[send] - rank * chunk,
        send_splits=[len(x) for x in sends],
        recv_slot=(recv // r) * per + (recv % r - rank * per), recv_splits=[len(x) for x in recvs], per_rank=per)


def kept_token_routes_host(kept: np.ndarray, seq_length: int, tp: int, rank: int) -> List[KeptTokenRoute]:
    """`kept_token_route` of each [b, r] in kept [N, b, r] (numpy, the host), all at once: the same routes,
    int32 tensors on the host. The plan's way: a few array operations for a whole iteration's layers and
    micro-batches instead of ~2·tp small ones per route."""
    N, b, r = kept.shape
    assert seq_length % tp == 0 and r % tp == 0, f"sequence parallel LTD needs tp={tp} to divide s and r={r}"
    chunk, per = seq_length // tp, r // tp
    # send: this rank's positions, ordered by (route, list owner d, sample, entry): with the kept list cut
    # into its tp owners' blocks, [N, b, tp, per] -> [N, tp, b, per] is that order, row-major
    blocks = kept.reshape(N, b, tp, per).transpose(0, 2, 1, 3)  # [N, tp, b, per]
    sn, sd, si, sj = np.nonzero(blocks // chunk == rank)
    sj = sd * per + sj
    send_counts = np.bincount(sn * tp + sd, minlength=N * tp).reshape(N, tp)
    # receive: this rank's block of every kept list, ordered by (route, position owner c, sample, entry)
    mine = kept[:, :, rank * per:(rank + 1) * per]  # [N, b, per]
    source = mine // chunk  # [N, b, per]
    rn, ri, rj = (grid.reshape(-1) for grid in np.indices(mine.shape))  # row-major
    key = rn * tp + source.reshape(-1)
    order = np.argsort(key, kind="stable")  # row-major within each (route, source) group
    recv_counts = np.bincount(key, minlength=N * tp).reshape(N, tp)
    send_sample, send_local = si, kept[sn, si, sj] - rank * chunk
    recv_slot = ri[order] * per + rj[order]  # flat slot in [b, r/tp]
    as_int32 = [torch.from_numpy(x.astype(np.int32)) for x in (send_sample, send_local, recv_slot)]
    send_bounds = np.concatenate([[0], np.cumsum(send_counts.sum(1))])
    recv_bounds = np.concatenate([[0], np.cumsum(recv_counts.sum(1))])
    return [KeptTokenRoute(send_sample=as_int32[0][send_bounds[k]:send_bounds[k + 1]],
                           send_local=as_int32[1][send_bounds[k]:send_bounds[k + 1]],
                           send_splits=send_counts[k].tolist(),
                           recv_slot=as_int32[2][recv_bounds[k]:recv_bounds[k + 1]],
                           recv_splits=recv_counts[k].tolist(), per_rank=per) for k in range(N)]


def _all_to_all(rows: torch.Tensor, out_splits: List[int], in_splits: List[int]) -> torch.Tensor:
    """[sum(in_splits), h] -> [sum(out_splits), h] over the TP group."""
    out = rows.new_empty(sum(out_splits), rows.shape[-1])
    dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=ps.get_tensor_model_parallel_group())
    return out


class _ToListOwners(torch.autograd.Function):
    """Forward: send each kept token of this rank's chunk to its list owner; assemble [b, r/tp, h].
    Backward: the gradients travel back and land on the kept positions (zero elsewhere)."""

    @staticmethod
    def forward(ctx, chunk, route: KeptTokenRoute):  # chunk: [b, s/tp, h]
        ctx.route, ctx.shape = route, chunk.shape
        b, _, h = chunk.shape
        rows = _all_to_all(chunk[route.send_sample, route.send_local], route.recv_splits, route.send_splits)
        out = chunk.new_empty(b * route.per_rank, h)  # [b·r/tp, h]: every slot is filled exactly once
        out[route.recv_slot] = rows
        return out.view(b, route.per_rank, h)  # [b, r/tp, h]

    @staticmethod
    def backward(ctx, grad):  # grad: [b, r/tp, h]
        route = ctx.route
        rows = _all_to_all(grad.reshape(-1, grad.shape[-1])[route.recv_slot], route.send_splits, route.recv_splits)
        grad_chunk = grad.new_zeros(ctx.shape)  # [b, s/tp, h]
        grad_chunk[route.send_sample, route.send_local] = rows
        return grad_chunk, None


class _FromListOwners(torch.autograd.Function):
    """Forward: return each output row to its position owner, which writes it over the kept position of a
    copy of its chunk. Backward: the kept positions' gradients travel to the list owners; the chunk's
    gradient passes through on the other positions."""

    @staticmethod
    def forward(ctx, out, chunk, route: KeptTokenRoute):  # out: [b, r/tp, h], chunk: [b, s/tp, h]
        ctx.route, ctx.out_shape = route, out.shape
        rows = _all_to_all(out.reshape(-1, out.shape[-1])[route.recv_slot], route.send_splits, route.recv_splits)
        new = chunk.clone()  # [b, s/tp, h]
        new[route.send_sample, route.send_local] = rows.to(new.dtype)
        return new

    @staticmethod
    def backward(ctx, grad):  # grad: [b, s/tp, h]
        route = ctx.route
        rows = _all_to_all(grad[route.send_sample, route.send_local], route.recv_splits, route.send_splits)
        grad_out = grad.new_empty(ctx.out_shape[0] * ctx.out_shape[1], grad.shape[-1])  # [b·r/tp, h]
        grad_out[route.recv_slot] = rows
        grad_chunk = grad.clone()
        grad_chunk[route.send_sample, route.send_local] = 0  # kept positions: the layer's output replaced them
        return grad_out.view(ctx.out_shape), grad_chunk, None


def run_layer_on_kept_sequence_parallel(
    layer: Callable,
    chunk: torch.Tensor,  # [b, s/tp, h]
    idx: torch.Tensor,  # [b, r] sorted kept positions
    position_ids: Optional[torch.Tensor] = None,  # [b, s]
    padding_mask: Optional[torch.Tensor] = None,  # [b, s]
    route: Optional[KeptTokenRoute] = None,
) -> torch.Tensor:
    """The sequence-parallel twin of `routing.run_layer_on_kept`: [b, s/tp, h] -> [b, s/tp, h]. `route` is
    idx's route for this rank, prepared by the plan; None: worked out here from idx."""
    idx = idx.long()  # [b, r]: the plan delivers int32; torch.gather takes int64
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    s = chunk.shape[1] * tp
    if route is None:
        route = kept_token_route(idx, s, tp, rank)
    assert route.per_rank * tp == idx.shape[1], "the route was made for another kept length"
    part = _ToListOwners.apply(chunk, route)  # [b, r/tp, h]
    pos = idx if position_ids is None else torch.gather(position_ids, 1, idx)  # [b, r], original positions
    pad = None if padding_mask is None else torch.gather(padding_mask, 1, idx)  # [b, r]
    out = layer(part, position_ids=pos, padding_mask=pad)  # [b, r/tp, h]
    assert out.shape == part.shape, "layer must map [b, r/tp, h] to [b, r/tp, h]"
    return _FromListOwners.apply(out, chunk, route)  # [b, s/tp, h]
