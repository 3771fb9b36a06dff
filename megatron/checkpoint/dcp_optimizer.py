"""The optimizer's state as parameter-shaped pieces (dcp_state.py's keys), plain or distributed.

Plain optimizer: every data-parallel rank holds every parameter's fp32 main copy and moments, so every
rank offers them and DCP writes one copy.

Distributed optimizer (ZeRO-1): DP rank d holds elements [d·n/dp, (d+1)·n/dp) of each bucket's flat
buffer, cutting parameters anywhere, so a shard is not a rectangular piece of anything. Saving gives
each parameter one owner, the DP rank whose shard holds its middle element (about 1/dp of the bytes
each, computed alike on every rank from the bucket layout), and one `all_to_all_single` per quantity
moves every rank's slice of a parameter to its owner, which offers the whole parameter-shaped state
(Megatron's `fully_sharded_model_space` does the same per parameter, with flattened ranges instead).
Split sizes are computed locally, nothing is exchanged to learn them. Loading needs no communication:
each rank reads, whole, the parameters its new shard touches (DCP reads whatever saved pieces overlap)
and keeps its slice, so the memory is about 1/dp of the state plus two parameters at the edges.

The AdamW step is the same for every parameter: one number, kept in common.json.

Glossary: q a quantity (fp32_param, exp_avg, exp_avg_sq); n_b a bucket's padded length; dp the
data-parallel size; m a main parameter (the whole parameter, or this rank's slice of it).
"""

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron.checkpoint.dcp_io import Chunks
from megatron.checkpoint.dcp_state import FP32_PARAM, MODEL, MOMENTS, global_names, host, moment_prefix, \
    param_chunks, targets_for


def adam_step(optimizer) -> int:
    steps = [int(s["step"]) for s in optimizer.adam.state.values() if "step" in s]
    return max(steps, default=0)


def quantities(optimizer) -> List[str]:
    """What this optimizer has to save: fp32 main parameters when the model is 16-bit, moments once a
    step was taken."""
    out = [] if all(m.aliased for m in optimizer.mains) else ["fp32_param"]
    return out + (list(MOMENTS) if adam_step(optimizer) > 0 else [])


def _prefix(q: str) -> str:
    return FP32_PARAM if q == "fp32_param" else moment_prefix(q)


def _local_value(optimizer, m, q: str) -> torch.Tensor:
    return m.main if q == "fp32_param" else optimizer.adam.state[m.main][q]


def _owner(bucket, p, off: int, dp: int) -> int:
    """The DP rank whose shard holds p's middle element."""
    n = bucket.numel // dp
    return min((off + (p.numel() - 1) // 2 - bucket.start) // n, dp - 1)


def optimizer_pieces(optimizer, model: torch.nn.Module, tp_rank: int, tp: int, copy: bool) -> Dict[str, Chunks]:
    """{optimizer.state.<q>.<key>: pieces} this rank offers. Distributed: a collective over the DP group."""
    qs = quantities(optimizer)
    if not qs:
        return {}
    names = global_names(model)
    if not optimizer.distributed:
        return {_prefix(q) + names[id(m.model)]: param_chunks(host(_local_value(optimizer, m, q), copy).view_as(m.model),
                                                           m.model, tp_rank, tp)
                for q in qs for m in optimizer.mains}
    owned = _gather_to_owners(optimizer, qs)
    return {_prefix(q) + names[id(p)]: param_chunks(value, p, tp_rank, tp)
            for p, values in owned for q, value in zip(qs, values)}


def _gather_to_owners(optimizer, qs: List[str]):
    """[(parameter, [its whole state per quantity, shaped like it, on the host])] for the parameters this
    rank owns; one all_to_all_single over the DP group per quantity."""
    sync = optimizer.sync
    dp, rank = sync.dp, sync.rank
    main_of = {id(m.model): m for m in optimizer.mains}
    plan = [(bucket, p, off, _owner(bucket, p, off, dp))  # every parameter, its bucket offset and owner
            for bucket in sync.buckets for p, off in zip(bucket.params, bucket.offsets)]

    def piece(bucket, p, off, r):  # [a, b) of p's flat elements in DP rank r's shard
        lo, hi = bucket.shard_range(r, dp)
        return max(off, lo) - off, min(off + p.numel(), hi) - off

    device = sync.buckets[0].grad_data.device if sync.buckets else torch.device("cpu")
    owned = [(bucket, p, off) for bucket, p, off, o in plan if o == rank]
    recv_sizes = [sum(max(0, piece(b, p, off, r)[1] - piece(b, p, off, r)[0]) for b, p, off in owned)
                  for r in range(dp)]
    out = {id(p): (p, []) for _, p, _ in owned}
    for q in qs:
        send, send_sizes = [], [0] * dp
        for owner in range(dp):  # grouped by destination, in bucket order within each
            for bucket, p, off, o in plan:
                a, b = piece(bucket, p, off, rank)
                if o == owner and a < b:
                    send.append(_local_value(optimizer, main_of[id(p)], q).detach().view(-1).float())  # [b - a]
                    send_sizes[owner] += b - a
        flat_send = torch.cat(send) if send else torch.zeros(0, device=device)  # [sum(send_sizes)]
        if dp > 1:
            flat_recv = torch.empty(sum(recv_sizes), dtype=torch.float32, device=device)  # [sum(recv_sizes)]
            dist.all_to_all_single(flat_recv, flat_send, recv_sizes, send_sizes, group=sync.group)
        else:
            flat_recv = flat_send
        flat_recv = flat_recv.cpu()
        starts = [sum(recv_sizes[:r]) for r in range(dp)]  # where source r's data begins
        for bucket, p, off in owned:  # each source sent its slices in this same order
            whole = torch.empty(p.numel(), dtype=torch.float32)  # [numel]
            for r in range(dp):
                a, b = piece(bucket, p, off, r)
                if a < b:
                    whole[a:b] = flat_recv[starts[r]:starts[r] + b - a]
                    starts[r] += b - a
            out[id(p)][1].append(whole.view(p.shape))
    return list(out.values())


# ---- loading ------------------------------------------------------------------------------------------------
def optimizer_targets(optimizer, model: torch.nn.Module, tp_rank: int, tp: int, saved: Dict[str, torch.Size],
                      step: int) -> Tuple[Dict[str, Chunks], Dict[int, Dict[str, torch.Tensor]]]:
    """({key: pieces to fill}, {id(parameter): {quantity: its whole state}}): the whole parameter-shaped
    state of every parameter this rank keeps a slice of (all of them without the distributed optimizer),
    which the pieces fill and `apply_loaded` then slices. The fp32 main parameters come from `fp32_param`
    when the checkpoint has it (a 16-bit run's), else from the weights of an fp32 checkpoint, read as
    fp32 in place of the model's own (rounded) load."""
    names = global_names(model)
    has_fp32 = any(k.startswith(FP32_PARAM) for k in saved)
    loading: Dict[int, Dict[str, torch.Tensor]] = {}
    out = {}
    for m in optimizer.mains:
        p = m.model
        if id(p) in loading:
            continue
        key = names[id(p)]
        qs = (["fp32_param"] if has_fp32 or not m.aliased else []) + (list(MOMENTS) if step > 0 else [])
        loading[id(p)] = wholes = {q: torch.zeros(p.shape, dtype=torch.float32) for q in qs}
        for q, t in wholes.items():
            source = MODEL + key if q == "fp32_param" and not has_fp32 else _prefix(q) + key
            out[source] = targets_for(t, p, key, tp_rank, tp, saved.get(source))
    return out, loading


@torch.no_grad()
def apply_loaded(optimizer, loading: Dict[int, Dict[str, torch.Tensor]], step: int) -> None:
    """Put the loaded parameter-shaped state (`optimizer_targets`' second value, filled) into the main
    parameters and AdamW (this rank's slices), and the main parameters back into the model (a 16-bit
    model's weights are the rounded main parameters)."""
    index = {id(t): i for i, t in enumerate(p for g in optimizer.adam.param_groups for p in g["params"])}
    adam_state = {}
    for m in optimizer.mains:
        wholes = loading[id(m.model)]
        if "fp32_param" in wholes:  # else an fp32 run whose weights, loaded in place, are its main parameters
            m.main.view(-1).copy_(wholes["fp32_param"].view(-1)[m.lo:m.hi])
        if step > 0:
            adam_state[index[id(m.main)]] = {
                "step": torch.tensor(float(step)),
                **{q: wholes[q].view(-1)[m.lo:m.hi].to(m.main.device).view_as(m.main).clone() for q in MOMENTS}}
    optimizer.adam.load_state_dict({"state": adam_state, "param_groups": optimizer.adam.state_dict()["param_groups"]})
    optimizer._copy_main_to_model()
    optimizer.sync.start_param_sync()
    optimizer.sync.finish_param_sync()
