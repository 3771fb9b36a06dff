"""Communication volume per GPU per iteration of the 1.3B random-LTD recipe, computed (not measured).

For each (tp, pp, dp) layout on 64 GPUs, what one GPU sends in one iteration (one optimizer step over a
global batch of G samples), by component, dense and with random-LTD at r = 128 (the schedule's start)
and at r = mean r over the whole run. Everything follows from the code paths. Under `--bf16` the
parameters are bf16 (trainer.py: `model.to(dtype)`, Megatron's Float16Module), so every activation and
activation gradient is bf16; gradients accumulate into fp32 `main_grad` buffers (ddp.py) unless
`--grad-reduce-in-bf16`. Bytes per element: a = parameter dtype (2 bf16, 4 fp32), g = gradient buffer
dtype (4 under --bf16, 2 with --grad-reduce-in-bf16), x = residual stream (a, or 4 with
--fp32-residual-connection).

    component   where                                   payload per iteration, one GPU of stage k
    DP grads    distributed/ddp.py, per bucket, after   P_k * g  (P_k: parameters of this rank's shard)
                the last backward: all-reduce, or
                reduce-scatter (--use-distributed-optimizer)
    DP params   the distributed optimizer's all-gather  P_k * a  (only --use-distributed-optimizer)
                of the updated parameters, per bucket
    TP          row-parallel proj and fc2: reduce_from  per micro-batch and layer on n tokens:
                (all-reduce forward); column-parallel     2 * b*n*h * a forward + 2 * b*n*h * a backward
                QKV and fc1: copy_to (all-reduce of the   n = s in dense layers, r in LTD layers
                input grad in backward). Both in the      first stage: + b*s*h*a (vocab-parallel embedding)
                parameter dtype: the norms hand the       last stage:  + b*s*h*a (LM head input grad)
                linears that dtype even with an fp32                   + 3 * b*s*4 (vocab-parallel CE on
                residual                                                fp32 logits: max, target, sum-exp)
    PP p2p      pipeline_parallel/p2p.py, 1F1B          per micro-batch and stage boundary: the [b, s, h]
                                                        activation forward, its grad backward, x bytes
    tied emb    trainer._sync_tied_embeddings, pp > 1   (V/tp) * h * g on the first and last stage; with
                                                        the distributed optimizer only this rank's
                                                        shard: (V/tp) * h / dp * g

With --sequence-parallel (tp > 1; AG all-gather, RS reduce-scatter, both over the TP group):

    TP          tensor_parallel/layers.py: column-      per micro-batch and layer on n tokens, each
                parallel GEMMs all-gather their input   b*n*h * a: forward 2 AG + 2 RS; backward 2 AG
                chunks (and again in backward for the   (the RS's) + 2 RS (input grads) + 2 AG (weight
                weight gradient), row-parallel GEMMs    gradient re-gathers): 10 b*n*h*a
                reduce-scatter their output             first stage: + b*s*h*a (embedding all-reduce, as
                                                        without SP) + b*s*h*x (AG: backward of the split)
                                                        last stage: + 3 * b*s*h*a (LM head: AG forward,
                                                        RS + AG backward) + the CE's 3 * b*s*4
    SP grads    ddp.allreduce_sequence_parallel_grads,  one all-reduce over TP of 6h per layer (two
                after the DP sync                       LayerNorms' weight and bias, proj and fc2 bias)
                                                        + 2h on the last stage (final LayerNorm), * g
    LTD a2a     random_ltd/sequence_parallel.py, per    4 all_to_all_single (2 forward, 2 backward) of
                LTD layer with r < s and micro-batch    kept rows, h * x bytes each; the layer itself
                                                        is the dense SP layer on n = r tokens
    PP p2p      the chunk [b, s/tp, h], x bytes

An all-to-all's rows whose source and destination are the same rank (a kept token whose list slot is in
its own chunk) sit in all_to_all_single's buffers but never cross the network: the model counts only the
rows sent to other ranks (the check also counts the self rows, separately, against the model). Forward,
rank c sends its kept tokens listed on other ranks (D_c) and returns the outputs of the rows it received
(U_c); backward the same counts the other way: 2 (D_c + U_c) rows per sample, LTD layer and micro-batch.
--check takes D_c, U_c from the run's keyed draw (`kept_token_route`); the tables use their expectation
over a uniform r-subset of the s positions, exact: the j-th kept position lies in chunk c with probability
P(N(c s/tp) <= j) - P(N((c+1) s/tp) <= j), N(x) ~ Hypergeometric(s, x, r) the kept count below position x.

Bytes sent per GPU, ring algorithms: an all-reduce over n ranks sends 2(n-1)/n x the payload (so nothing
at n = 1; the tied-embedding group has 2 ranks: 1 x); a reduce-scatter or an all-gather sends (n-1)/n x
the full buffer; an all-to-all sends its rows for other ranks directly. So per parameter, plain DP sends
2(d-1)/d * g and the distributed optimizer (d-1)/d * (g + a): 6(d-1)/d instead of 8(d-1)/d bytes under
--bf16, and the same 4(d-1)/d as the all-reduce with --grad-reduce-in-bf16. p2p sends what it sends (a
middle stage talks to two neighbours, the first and last stage to one). Micro-batches per DP rank:
M = G / (b * dp).

Left out: activation recomputation (`--recompute-granularity full` repeats a recomputed layer's forward
collectives and, under SP, its LTD forward all-to-alls), 0-dim all-reduces (DP loss average, the grad-norm
and found-inf reductions), the per-iteration all-reduce of a few stop flags over all ranks
(`signals.any_rank`), evaluation, checkpoint barriers and the distributed optimizer's state gather at a
save; and the distributed optimizer's buffer padding (parameter starts aligned to 64 elements, bucket ends
to lcm(dp, 128)), which is zero at the 1.3B shape, where every parameter's size is a multiple of 128 (the
--check runs pad 64-256 elements).
Parameters: learned absolute positions (replicated across TP, first stage), LayerNorm with bias, linear
biases, ffn = 4h, tied embeddings (the last stage's copy of the word embeddings is a parameter there,
so it is also in that stage's DP reduction). The padded vocabulary depends on tp (a multiple of
128 * tp): 50304 at tp 1, 50432 at tp 2, 50688 at tp 4.

The mean r is the mean of r_t over every iteration of the run: MSLG 128 -> 2048 in steps of 16 over
200k iterations, then r = s until the 4800B layer-token stop (`LayerTokenCurve.iterations_to_reach`).
TP traffic is linear in r, so TP volume at the mean r is the run's mean TP volume per iteration. The
LTD all-to-alls are not: the --sequence-parallel table's r̄ row averages them over the run's r_t.

Tables show the mean over all GPUs (total traffic / world size) per component, and the busiest GPU's
total; a second table compares the DP-group traffic (DP grads + params + tied emb) of plain DP and the
distributed optimizer, fp32 and bf16 gradients; `--json` adds every stage's breakdown. GB = 1e9 bytes.

`--sequence-parallel` prints, for the layouts with tp > 1, TP traffic without and with SP, the LTD
all-to-alls and the SP gradient all-reduce at several r; `--shape 13b` does so for a 13B-shaped GPT
(40 layers, h 5120, s 2048, b 4, G 512) at TP = 8.

`--check` confirms the model on a tiny GPT by counting the collectives real 8-rank gloo runs issue (bytes
handed to each collective: the all-reduced tensor, the reduce-scatter's input, the all-gather's output,
the all-to-all's rows to other ranks and, apart, to itself, the p2p sends), plain, with the distributed
optimizer (its padding read off its buffers) and with --sequence-parallel and random-LTD mid-ramp (r
changes every iteration; the all-to-all rows come from the run's keyed draw), per rank and exactly.

    python bench/comm_volume.py                # markdown tables (the recipe: --bf16, plain DP)
    python bench/comm_volume.py --use-distributed-optimizer --grad-reduce-in-bf16   # other settings
    python bench/comm_volume.py --sequence-parallel [--shape 13b]   # TP traffic with SP, and LTD's all-to-alls
    python bench/comm_volume.py --json         # the same numbers, per stage, as JSON
    python bench/comm_volume.py --check        # tiny 8-rank gloo runs: counted vs model (~2 min)
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from math import comb
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYOUTS = [(1, 1, 64), (2, 1, 32), (4, 1, 16), (1, 2, 32), (2, 2, 16), (2, 4, 8)]
COMPONENTS = ("dp_grads", "dp_params", "tp", "pp_p2p", "tied_emb", "sp_grads", "ltd_a2a")  # what crosses the network
CHECKED = COMPONENTS + ("ltd_a2a_self",)  # ... and the all-to-alls' rows a rank hands itself


@dataclass(frozen=True)
class ModelShape:
    """The recipe (examples/gpt_1.3b_common.sh + pretrain_gpt_1.3b_ltd.sh), or a tiny one for --check."""

    num_layers: int = 24
    hidden: int = 2048
    heads: int = 16
    seq: int = 2048
    global_batch: int = 512
    micro_batch: int = 4
    vocab: int = 50257  # GPT-2 BPE; padded per tp
    divisible_by: int = 128
    ltd_layers: tuple[int, ...] = tuple(range(1, 23))  # default: every layer but the first and last
    ltd_start: int = 128
    ltd_step: int = 16
    ltd_ramp_iters: int = 200_000
    train_layer_tokens: int = 4800 * 10**9

    @property
    def ffn(self) -> int:
        return 4 * self.hidden


# A 13B-shaped GPT (GPT-3 13B's 40 layers, h 5120, 40 heads; bench/memory.py's 13B shape, PERFORMANCE.md
# §12.2: b 4, G 512), for --sequence-parallel at TP = 8; the random-LTD schedule and layer set as the 1.3B
# recipe's (no mean r: that needs its run length).
SHAPE_13B = ModelShape(num_layers=40, hidden=5120, heads=40, ltd_layers=tuple(range(1, 39)))
LAYOUTS_13B = [(8, 1, 8), (8, 2, 4), (8, 4, 2)]
SP_KEEPS = (2048, 1024, 512, 128)  # r of the --sequence-parallel table (with the run's mean r for the 1.3B)


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of what moves, and how DP reduces: the precision and DDP flags of a run."""

    param: int = 2  # a: --bf16 parameters; TP all-reduces both ways, the distributed optimizer's all-gather
    grad: int = 4  # g: main_grad, fp32 under --bf16; 2 with --grad-reduce-in-bf16
    residual: int = 2  # x: residual stream = pipeline messages; 4 with --fp32-residual-connection
    distributed_optimizer: bool = False  # reduce-scatter grads + all-gather params instead of all-reduce

    def flags(self) -> list[str]:
        """The trainer flags that give these numerics."""
        out = [] if self.param == 4 else ["--bf16"]
        if self.param == 2 and self.grad == 2:
            out.append("--grad-reduce-in-bf16")
        if self.param == 2 and self.residual == 4:
            out.append("--fp32-residual-connection")
        return out + (["--use-distributed-optimizer"] if self.distributed_optimizer else [])


BF16, FP32 = Numerics(), Numerics(param=4, grad=4, residual=4)


def padded_vocab(m: ModelShape, tp: int) -> int:
    from megatron.core.tokenizer import vocab_size_with_padding

    return vocab_size_with_padding(m.vocab, m.divisible_by, tp)


def ring(n: int) -> float:
    """Bytes a rank sends in a ring all-reduce over n ranks, per byte of payload."""
    return 2.0 * (n - 1) / n


def ring_half(n: int) -> float:
    """Bytes a rank sends in a ring reduce-scatter or all-gather over n ranks, per byte of the full buffer."""
    return (n - 1) / n


def stage_params(m: ModelShape, tp: int, pp: int, k: int) -> int:
    """Parameters held by one GPU of pipeline stage k (its TP shard)."""
    h, f = m.hidden, m.ffn
    layer = ((3 * h * h + 3 * h) // tp  # QKV weight and bias: column-parallel
             + h * h // tp + h  # proj: row-parallel weight, replicated bias
             + (f * h + f) // tp  # fc1: column-parallel
             + h * f // tp + h  # fc2: row-parallel weight, replicated bias
             + 4 * h)  # two LayerNorms (weight, bias), replicated
    n = layer * (m.num_layers // pp)
    v = padded_vocab(m, tp) // tp * h
    if k == 0:
        n += v + m.seq * h  # word embeddings (vocab-parallel) + learned positions (replicated)
    if k == pp - 1:
        n += 2 * h  # final LayerNorm
        if pp > 1:
            n += v  # the last stage's copy of the tied word embeddings
    return n


def _kept_below_cdf(s: int, r: int, x: int) -> list[int]:
    """[P(N(x) <= j) * C(s, r) for j < r], N(x) the kept count among the first x positions (hypergeometric)."""
    a, b, acc, out = 1, comb(s - x, r), 0, []  # a = C(x, j), b = C(s - x, r - j), updated exactly
    for j in range(r):
        acc += a * b
        out.append(acc)
        a = a * (x - j) // (j + 1) if j < x else 0
        n = s - x - r + j + 1
        b = b * (r - j) // n if n > 0 else comb(s - x, r - j - 1)
    return out


@lru_cache(maxsize=None)
def displaced_rows(s: int, r: int, tp: int) -> tuple[tuple[float, float], ...]:
    """((D_c, U_c) per TP rank c): expected over a uniform kept r-subset of s positions, per sample, D_c
    kept tokens in c's chunk whose list slot is on another rank, U_c list slots of c filled from another
    rank's chunk (see the docstring). Exact integer sums, one division at the end; r = s: nothing moves."""
    if r >= s:
        return ((0.0, 0.0),) * tp
    chunk, per, total = s // tp, r // tp, comb(s, r)
    cdf = [_kept_below_cdf(s, r, c * chunk) for c in range(tp + 1)]
    out = []
    for c in range(tp):
        inside = [cdf[c][j] - cdf[c + 1][j] for j in range(r)]  # * total: P(j-th kept position in chunk c)
        listed_here = sum(inside[j] for j in range(c * per, (c + 1) * per))  # ... and its list slot on c
        out.append(((sum(inside) - listed_here) / total, (per * total - listed_here) / total))
    return tuple(out)


def run_mean_displaced_rows(m: ModelShape, tp: int) -> tuple[tuple[float, float], ...]:
    """displaced_rows averaged over every iteration of the run (r_t from the MSLG staircase): the all-to-alls
    are not linear in r, so the mean r's own would not be the run's mean."""
    from megatron.core.random_ltd import MSLGSchedule

    iters = mean_keep(m)["iterations"]
    sched = MSLGSchedule(m.seq, m.ltd_start, m.ltd_step, m.ltd_ramp_iters)
    acc = [[0.0, 0.0] for _ in range(tp)]
    for start, stop, r in sched.runs(iters):
        for c, (d, u) in enumerate(displaced_rows(m.seq, r, tp)):
            acc[c][0] += (stop - start) * d
            acc[c][1] += (stop - start) * u
    return tuple((d / iters, u / iters) for d, u in acc)


def stage_volume(m: ModelShape, nx: Numerics, tp: int, pp: int, dp: int, k: int, keep: int,
                 dp_padding: int = 0, sp: bool = False, tp_rank: Optional[int] = None,
                 a2a_rows: Optional[tuple[int, int]] = None, routes=None) -> dict[str, dict]:
    """{component: {"payload": bytes handed to collectives, "sent": bytes this GPU sends}} for stage k.

    dp_padding: elements the distributed optimizer's buffers add for alignment (the check passes what
    the real buffers hold; the tables leave it out). sp: --sequence-parallel (tp > 1). a2a_rows: (rows to
    other ranks, rows to itself) of this GPU's LTD all-to-alls in the iteration (the check passes the
    run's); None: the expectation for TP rank tp_rank, or the mean over the TP ranks, from `routes`
    (displaced_rows per rank; default those of r = keep)."""
    b, s, h = m.micro_batch, m.seq, m.hidden
    assert m.global_batch % (b * dp) == 0 and m.num_layers % pp == 0
    M = m.global_batch // (b * dp)
    per = m.num_layers // pp
    a = nx.param
    sp = sp and tp > 1  # the trainer turns --sequence-parallel off at tp = 1
    out = {}
    elements = stage_params(m, tp, pp, k) + (dp_padding if nx.distributed_optimizer else 0) if dp > 1 else 0
    if nx.distributed_optimizer:  # reduce-scatter of the grads, all-gather of the updated parameters
        out["dp_grads"] = {"payload": elements * nx.grad, "sent": elements * nx.grad * ring_half(dp)}
        out["dp_params"] = {"payload": elements * a, "sent": elements * a * ring_half(dp)}
    else:
        out["dp_grads"] = {"payload": elements * nx.grad, "sent": elements * nx.grad * ring(dp)}
        out["dp_params"] = {"payload": 0, "sent": 0.0}
    layers = range(k * per, (k + 1) * per)
    ltd = [layer for layer in layers if layer in m.ltd_layers and keep < s]  # this stage's dropping layers
    ar = rs_ag = 0  # TP payload of all-reduces, and of reduce-scatters + all-gathers (full buffers)
    if tp > 1:
        for layer in layers:
            n = keep if layer in ltd else s
            if sp:
                rs_ag += M * 10 * b * n * h * a  # 2 AG + 2 RS forward; 2 AG + 2 RS + 2 wgrad AG backward
            else:
                ar += M * 2 * b * n * h * 2 * a  # two all-reduces forward, two backward
        if k == 0:
            ar += M * b * s * h * a  # vocab-parallel embedding output
            rs_ag += M * b * s * h * nx.residual if sp else 0  # the split's backward all-gather
        if k == pp - 1:
            ar += M * 3 * b * s * 4  # vocab-parallel CE on fp32 logits: max, target, sum-exp
            if sp:
                rs_ag += M * 3 * b * s * h * a  # LM head: AG forward; RS of the input grad + wgrad AG backward
            else:
                ar += M * b * s * h * a  # LM head input grad
    out["tp"] = {"payload": ar + rs_ag, "sent": ar * ring(tp) + rs_ag * ring_half(tp)}
    sp_grads = ((6 * h * per + (2 * h if k == pp - 1 else 0)) * nx.grad) if sp else 0
    out["sp_grads"] = {"payload": sp_grads, "sent": sp_grads * ring(tp)}
    if a2a_rows is None:
        if sp and ltd:
            routes = routes or displaced_rows(s, keep, tp)
            ranks = range(tp) if tp_rank is None else [tp_rank]
            other = sum(2 * (routes[c][0] + routes[c][1]) for c in ranks) / len(ranks)  # per sample and layer
            own = sum(4 * (keep // tp - routes[c][0]) for c in ranks) / len(ranks)
            a2a_rows = (M * b * len(ltd) * other, M * b * len(ltd) * own)
        else:
            a2a_rows = (0, 0)
    out["ltd_a2a"] = {"payload": a2a_rows[0] * h * nx.residual, "sent": a2a_rows[0] * h * nx.residual}
    out["ltd_a2a_self"] = {"payload": a2a_rows[1] * h * nx.residual, "sent": 0}
    neighbours = (k > 0) + (k < pp - 1)
    p2p = M * b * (s // tp if sp else s) * h * nx.residual * neighbours
    out["pp_p2p"] = {"payload": p2p, "sent": p2p}
    tied = 0
    if pp > 1 and k in (0, pp - 1):
        tied = padded_vocab(m, tp) // tp * h * nx.grad
        tied //= dp if nx.distributed_optimizer else 1  # only this rank's shard of the tied weight's bucket
    out["tied_emb"] = {"payload": tied, "sent": tied * ring(2)}
    return out


def layout_volume(m: ModelShape, nx: Numerics, tp: int, pp: int, dp: int, keep: int, sp: bool = False,
                  routes=None) -> dict:
    """Mean over the GPUs, and the busiest GPU; under SP with random-LTD the TP ranks of a stage differ
    (the all-to-alls), so every (stage, TP rank) is one GPU kind."""
    ranks = range(tp) if sp and tp > 1 and keep < m.seq else [None]
    gpus = [(k, c, stage_volume(m, nx, tp, pp, dp, k, keep, sp=sp, tp_rank=c, routes=routes))
            for k in range(pp) for c in ranks]
    mean = {c: sum(v[c]["sent"] for _, _, v in gpus) / len(gpus) for c in COMPONENTS}  # every kind: equal count
    totals = [sum(v[c]["sent"] for c in COMPONENTS) for _, _, v in gpus]
    busiest = max(range(len(gpus)), key=lambda i: totals[i])
    peers = [totals[i] for i, g in enumerate(gpus) if g[0] == gpus[busiest][0]]  # its stage's TP ranks
    tp_rank = gpus[busiest][1] if max(peers) - min(peers) > 1e-9 * max(peers) else None  # None: all alike
    return {"keep": keep, "mean_per_gpu_sent": mean, "mean_total": sum(mean.values()),
            "busiest_stage": gpus[busiest][0], "busiest_tp_rank": tp_rank,
            "busiest_total": totals[busiest],
            "stages": [{"stage": k, "tp_rank": c, **{n: v[n] for n in COMPONENTS}, "total_sent": totals[i]}
                       for i, (k, c, v) in enumerate(gpus)]}


def dp_group_traffic(m: ModelShape, nx: Numerics, tp: int, pp: int, dp: int) -> float:
    """Mean bytes per GPU per iteration over DP and the tied-embedding group (independent of r)."""
    stages = [stage_volume(m, nx, tp, pp, dp, k, m.seq) for k in range(pp)]
    return sum(st[c]["sent"] for st in stages for c in ("dp_grads", "dp_params", "tied_emb")) / pp


def mean_keep(m: ModelShape) -> dict:
    """Iterations of the run and the mean r over them (exact integer sums of the MSLG staircase)."""
    from megatron.core.random_ltd import LayerTokenCurve, MSLGSchedule

    sched = MSLGSchedule(m.seq, m.ltd_start, m.ltd_step, m.ltd_ramp_iters)
    curve = LayerTokenCurve(m.num_layers, m.seq, m.global_batch, len(m.ltd_layers), sched)
    iters = curve.iterations_to_reach(m.train_layer_tokens)
    total_r = sched.sum_kept_lengths(iters)
    ramp = m.ltd_ramp_iters
    return {"iterations": iters, "mean_r": total_r / iters, "full_length_iteration": sched.full_length_iteration(),
            "mean_r_during_ramp": sched.sum_kept_lengths(ramp) / ramp}


DP_VARIANTS = {  # the DP-group comparison of markdown(): name -> numerics, for a bf16 model
    "all-reduce, fp32 grads": BF16,
    "dist. opt., fp32 grads": replace(BF16, distributed_optimizer=True),
    "all-reduce, bf16 grads": replace(BF16, grad=2),
    "dist. opt., bf16 grads": replace(BF16, grad=2, distributed_optimizer=True),
}


def compute(m: ModelShape, nx: Numerics) -> dict:
    mk = mean_keep(m)
    keeps = {"dense": m.seq, "ltd_r_start": m.ltd_start, "ltd_r_mean": mk["mean_r"]}
    rows = []
    for tp, pp, dp in LAYOUTS:
        row = {"tp": tp, "pp": pp, "dp": dp, "micro_batches_per_rank": m.global_batch // (m.micro_batch * dp),
               "padded_vocab": padded_vocab(m, tp), "params_per_gpu_max": max(
                   stage_params(m, tp, pp, k) for k in range(pp))}
        for name, keep in keeps.items():
            row[name] = layout_volume(m, nx, tp, pp, dp, keep)
        if nx.param == 2:
            row["dp_group_by_variant"] = {name: dp_group_traffic(m, v, tp, pp, dp) for name, v in DP_VARIANTS.items()}
        rows.append(row)
    return {"model": {**asdict(m), "ltd_layers": f"{m.ltd_layers[0]}-{m.ltd_layers[-1]}"},
            "numerics": {**asdict(nx), "flags": " ".join(nx.flags()) or "(fp32)"}, "schedule": mk,
            "keeps": keeps, "layouts": rows, "units": "bytes sent per GPU per iteration"}


def markdown(result: dict) -> str:
    gb = 1e9
    mk = result["schedule"]
    lines = [
        f"Flags: {result['numerics']['flags']}.",
        "",
        (f"Mean r over the run: {mk['mean_r']:.1f} ({mk['iterations']:,} iterations; r reaches s at iteration "
         f"{mk['full_length_iteration']:,}; mean over the 200k-iteration ramp alone {mk['mean_r_during_ramp']:.1f})."),
        "",
        ("GB sent per GPU per iteration, mean over the 64 GPUs. DP grads, DP params, PP p2p and tied emb do not "
         "depend on r."),
        "",
        ("| tp | pp | dp | M | DP grads | DP params | PP p2p | tied emb | TP dense | TP r=128 | TP r̄ | total dense | "
         "total r=128 | total r̄ | busiest GPU dense / r=128 / r̄ |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["layouts"]:
        d, a, r = row["dense"], row["ltd_r_start"], row["ltd_r_mean"]
        md = d["mean_per_gpu_sent"]

        def busy(v, pp=row["pp"]):
            return f"{v['busiest_total'] / gb:.2f}" + (f" (stage {v['busiest_stage']})" if pp > 1 else "")

        lines.append(
            f"| {row['tp']} | {row['pp']} | {row['dp']} | {row['micro_batches_per_rank']} "
            f"| {md['dp_grads'] / gb:.2f} | {md['dp_params'] / gb:.2f} | {md['pp_p2p'] / gb:.2f} "
            f"| {md['tied_emb'] / gb:.2f} "
            f"| {md['tp'] / gb:.2f} | {a['mean_per_gpu_sent']['tp'] / gb:.2f} | {r['mean_per_gpu_sent']['tp'] / gb:.2f} "
            f"| {d['mean_total'] / gb:.2f} | {a['mean_total'] / gb:.2f} | {r['mean_total'] / gb:.2f} "
            f"| {busy(d)} / {busy(a)} / {busy(r)} |")
    if "dp_group_by_variant" in result["layouts"][0]:
        names = list(DP_VARIANTS)
        lines += ["", ("DP-group traffic (DP grads + DP params + tied emb), GB per GPU per iteration, mean over the "
                       "GPUs, bf16 parameters:"), "",
                  "| tp | pp | dp | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for row in result["layouts"]:
            v = row["dp_group_by_variant"]
            lines.append(f"| {row['tp']} | {row['pp']} | {row['dp']} | "
                         + " | ".join(f"{v[n] / gb:.2f}" for n in names) + " |")
    return "\n".join(lines)


def compute_sp(m: ModelShape, nx: Numerics, layouts: list, keeps: dict) -> dict:
    """--sequence-parallel: per layout with tp > 1 and kept length, the volumes without and with SP."""
    rows = []
    for tp, pp, dp in layouts:
        if tp == 1:
            continue
        for name, keep in keeps.items():
            routes = run_mean_displaced_rows(m, tp) if name == "r̄" else None  # the run's mean, not r̄'s
            rows.append({"tp": tp, "pp": pp, "dp": dp, "r": name, "keep": keep,
                         "without_sp": layout_volume(m, nx, tp, pp, dp, keep),
                         "with_sp": layout_volume(m, nx, tp, pp, dp, keep, sp=True, routes=routes)})
    return {"model": {**asdict(m), "ltd_layers": f"{m.ltd_layers[0]}-{m.ltd_layers[-1]}"},
            "numerics": {**asdict(nx), "flags": " ".join(nx.flags()) or "(fp32)"}, "keeps": keeps,
            "rows": rows, "units": "bytes sent per GPU per iteration"}


def sp_keeps(m: ModelShape) -> dict:
    """The r of the SP table: the fixed ones below s, and the run's mean r for the 1.3B recipe."""
    keeps = {"dense" if r == m.seq else str(r): r for r in SP_KEEPS if r <= m.seq}
    if m == ModelShape():
        keeps["r̄"] = mean_keep(m)["mean_r"]
    return keeps


def sp_markdown(result: dict) -> str:
    gb = 1e9
    m = result["model"]
    lines = [
        f"Flags: {result['numerics']['flags']}; L={m['num_layers']} h={m['hidden']} s={m['seq']} b={m['micro_batch']} "
        f"G={m['global_batch']}, LTD layers {m['ltd_layers']}.",
        "",
        ("GB sent per GPU per iteration, mean over the GPUs. TP: the layers' and the embedding / LM head / loss "
         "collectives; a2a: random-LTD's all-to-alls (rows to other ranks; expected over the draw); SP grads: "
         "the TP all-reduce of the norm and row-parallel bias gradients; total: every component (DP, PP, tied "
         "embeddings included)."),
        "",
        ("| tp | pp | dp | r | TP | TP, SP | a2a, SP | SP grads | PP p2p / SP | total | total, SP | SP / no SP "
         "| busiest GPU, SP |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        w, v = row["without_sp"], row["with_sp"]
        mw, mv = w["mean_per_gpu_sent"], v["mean_per_gpu_sent"]
        where = [f"stage {v['busiest_stage']}"] if row["pp"] > 1 else []
        where += [f"TP rank {v['busiest_tp_rank']}"] if v["busiest_tp_rank"] is not None else []
        r = f"{row['keep']:.0f}" if row["r"] == "r̄" else row["r"]
        lines.append(
            f"| {row['tp']} | {row['pp']} | {row['dp']} | {'r̄ = ' + r if row['r'] == 'r̄' else r} "
            f"| {mw['tp'] / gb:.2f} | {mv['tp'] / gb:.2f} | {mv['ltd_a2a'] / gb:.3f} | {mv['sp_grads'] / gb:.4f} "
            f"| {mw['pp_p2p'] / gb:.2f} / {mv['pp_p2p'] / gb:.2f} | {w['mean_total'] / gb:.2f} "
            f"| {v['mean_total'] / gb:.2f} | {v['mean_total'] / w['mean_total']:.3f} "
            f"| {v['busiest_total'] / gb:.2f}" + (f" ({', '.join(where)})" if where else "") + " |")
    return "\n".join(lines)


# ---- --check: count the collectives of a real run and compare ------------------------------------------

TINY = ModelShape(num_layers=4, hidden=64, heads=4, seq=64, global_batch=16, micro_batch=2, vocab=1000,
                  ltd_layers=(1, 2), ltd_start=32, ltd_step=16, ltd_ramp_iters=10**8, train_layer_tokens=0)
# the sequence-parallel runs: random-LTD mid-ramp, r = 16, 32, 48 in the three iterations (tp | 16)
TINY_RAMP = replace(TINY, ltd_start=16, ltd_ramp_iters=3)
CHECK_ITERS = 3
CHECK_SEED = 1234


def _count_worker(out_dir: str, argv: list[str]) -> None:
    """Runs on each torchrun rank: wrap the collectives, run pretrain_gpt_ltd.py, dump the counts."""
    import runpy

    import torch.distributed as dist

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import ddp
    from megatron.core.tensor_parallel import mappings

    counts = collections.Counter()
    syncs = []
    in_sp_grads = [False]

    def kind(group):
        for name, g in (("tp", ps.get_tensor_model_parallel_group()), ("dp", ps.get_data_parallel_group()),
                        ("tied_emb", ps.get_embedding_group()), ("mp", ps.get_model_parallel_group())):
            if g is not None and group is g:
                return name
        return "other"

    real_all_reduce, real_batch = dist.all_reduce, dist.batch_isend_irecv
    real_reduce_scatter, real_all_gather = ddp.reduce_scatter_single, ddp.all_gather_single
    real_gather_list, real_all_to_all = dist.all_gather, dist.all_to_all_single
    real_tp_reduce_scatter = mappings.reduce_scatter_single

    def all_reduce(tensor, *args, group=None, **kwargs):
        control = group is None and tensor.numel() <= 8  # signals.any_rank: the per-iteration stop flags
        if tensor.dim() > 0 and not control:  # 0-dim: loss average, grad norm, found-inf (left out of the model)
            name = kind(group)
            if name == "tp" and in_sp_grads[0]:
                name = "sp_grads"
            counts["dp_grads" if name == "dp" else name] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, group=group, **kwargs)

    def reduce_scatter(output, input, *args, group=None, **kwargs):  # the distributed optimizer's grads
        counts["dp_grads" if kind(group) == "dp" else "other"] += input.numel() * input.element_size()
        return real_reduce_scatter(output, input, *args, group=group, **kwargs)

    def all_gather(output, input, *args, group=None, **kwargs):  # ... and its updated parameters
        counts["dp_params" if kind(group) == "dp" else "other"] += output.numel() * output.element_size()
        return real_all_gather(output, input, *args, group=group, **kwargs)

    def all_gather_list(tensor_list, tensor, *args, group=None, **kwargs):  # sequence parallel: mappings._gather_seq
        counts["tp" if kind(group) == "tp" else "other"] += sum(t.numel() * t.element_size() for t in tensor_list)
        return real_gather_list(tensor_list, tensor, *args, group=group, **kwargs)

    def tp_reduce_scatter(output, input, *args, group=None, **kwargs):  # ... and mappings._reduce_scatter_seq
        counts["tp" if kind(group) == "tp" else "other"] += input.numel() * input.element_size()
        return real_tp_reduce_scatter(output, input, *args, group=group, **kwargs)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        # random-LTD under SP: rows to other ranks, and apart the rows a rank hands itself
        assert input_split_sizes is not None and input.dim() == 2, "the model knows the row all-to-all only"
        row = input.shape[1] * input.element_size()
        own = input_split_sizes[dist.get_rank(group)]
        name = "ltd_a2a" if kind(group) == "tp" else "other"
        counts[name] += (sum(input_split_sizes) - own) * row
        counts[name + "_self"] += own * row
        return real_all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    def batch_isend_irecv(ops):
        for op in ops:
            if op.op is dist.isend:
                counts["pp_p2p"] += op.tensor.numel() * op.tensor.element_size()
        return real_batch(ops)

    real_init = ddp.DataParallelGradSync.__init__
    real_sp_grads = ddp.DataParallelGradSync.allreduce_sequence_parallel_grads

    def init(self, *args, **kwargs):  # remember the trainer's buffers, to read their padding
        real_init(self, *args, **kwargs)
        syncs.append(self)

    def sp_grads(self, *args, **kwargs):  # its all-reduce over TP is the SP grads', not the layers'
        in_sp_grads[0] = True
        try:
            return real_sp_grads(self, *args, **kwargs)
        finally:
            in_sp_grads[0] = False

    dist.all_reduce, dist.batch_isend_irecv = all_reduce, batch_isend_irecv
    dist.all_gather, dist.all_to_all_single = all_gather_list, all_to_all_single
    ddp.reduce_scatter_single, ddp.all_gather_single = reduce_scatter, all_gather
    mappings.reduce_scatter_single = tp_reduce_scatter
    ddp.DataParallelGradSync.__init__ = init
    ddp.DataParallelGradSync.allreduce_sequence_parallel_grads = sp_grads
    sys.argv = [os.path.join(REPO, "pretrain_gpt_ltd.py")] + argv
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    padding = sum(buf.numel for s in syncs for buf in s.buffers) - sum(p.numel() for s in syncs for p in s.params)
    with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"pp_rank": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
                   "dp_rank": ps.get_data_parallel_rank(), "counts": dict(counts), "padding": padding}, f)


def routed_rows(m: ModelShape, tp: int, pp: int, dp: int, k: int, c: int, d: int, t: int, keep: int,
                seed: int = CHECK_SEED) -> tuple[int, int]:
    """(rows to other ranks, rows to itself) of TP rank c's LTD all-to-alls, stage k, DP rank d, iteration t:
    the run's own keyed draw (the plan's sample ids and layers) through `kept_token_route`."""
    from megatron.core.datasets.samplers import global_sample_offsets
    from megatron.core.random_ltd.sampler import kept_indices_for_layers
    from megatron.core.random_ltd.sequence_parallel import kept_token_route

    import torch

    per = m.num_layers // pp
    layers = [layer for layer in range(k * per, (k + 1) * per) if layer in m.ltd_layers]
    if tp == 1 or keep >= m.seq or not layers:
        return 0, 0
    other = own = 0
    for micro in range(m.global_batch // (m.micro_batch * dp)):
        ids = torch.from_numpy(global_sample_offsets(micro, m.micro_batch, d, dp))  # [b]
        for idx in kept_indices_for_layers(seed, t, ids, layers, m.seq, keep):  # [b, r] per layer
            route = kept_token_route(idx, m.seq, tp, c)
            assert route.send_splits[c] == route.recv_splits[c]
            # forward: to list owners (send_splits), outputs back (recv_splits); backward the same reversed
            other += 2 * (sum(route.send_splits) + sum(route.recv_splits) - 2 * route.send_splits[c])
            own += 4 * route.send_splits[c]
    return other, own


# 8 ranks each: TP + first/last stage, middle stages; the distributed optimizer on both, and with bf16
# gradients, several buckets and both overlaps (which change when bytes move, not how many); sequence
# parallel with random-LTD mid-ramp: TP=2 on one stage, TP=2 x PP=2 x DP=2 with the distributed optimizer,
# TP=4 x PP=2 (uneven all-to-alls across more than one boundary)
CHECK_RUNS = [((2, 2, 2), [], TINY), ((1, 4, 2), [], TINY), ((2, 2, 2), ["--use-distributed-optimizer"], TINY),
              ((1, 2, 4), ["--use-distributed-optimizer", "--grad-reduce-in-bf16", "--overlap-grad-reduce",
                           "--overlap-param-gather", "--ddp-bucket-size", "20000"], TINY),
              ((2, 1, 4), ["--sequence-parallel"], TINY_RAMP),
              ((2, 2, 2), ["--sequence-parallel", "--use-distributed-optimizer"], TINY_RAMP),
              ((4, 2, 1), ["--sequence-parallel"], TINY_RAMP)]


def check(nx: Numerics, sequence_parallel_only: bool = False) -> bool:
    runs = [r for r in CHECK_RUNS if nx.param == 2 or "--grad-reduce-in-bf16" not in r[1]]  # needs --bf16
    if sequence_parallel_only:
        runs = [r for r in runs if "--sequence-parallel" in r[1]]
    for layout, extra, m in runs:  # stops at the first failure
        run_nx = replace(nx, distributed_optimizer=nx.distributed_optimizer or "--use-distributed-optimizer" in extra,
                         grad=2 if "--grad-reduce-in-bf16" in extra else nx.grad)
        if not check_layout(run_nx, *layout, extra=[f for f in extra if f not in run_nx.flags()], m=m):
            return False
    return True


def check_layout(nx: Numerics, tp: int, pp: int, dp: int, extra: list[str] = (), m: ModelShape = TINY) -> bool:
    from megatron.core.random_ltd import MSLGSchedule

    sp = "--sequence-parallel" in extra
    argv = ["--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden), "--num-attention-heads",
            str(m.heads), "--seq-length", str(m.seq), "--micro-batch-size", str(m.micro_batch),
            "--global-batch-size", str(m.global_batch), "--lr", "1e-4", "--train-iters", str(CHECK_ITERS),
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(m.vocab), "--mock-data",
            "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0", "--distributed-backend", "gloo",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--seed", str(CHECK_SEED),
            "--random-ltd", "--random-ltd-start-seq-length", str(m.ltd_start), "--random-ltd-seq-step",
            str(m.ltd_step), "--random-ltd-ramp-iters", str(m.ltd_ramp_iters),
            "--random-ltd-layers", ",".join(map(str, m.ltd_layers))] + nx.flags() + list(extra)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        cmd = [torchrun, "--standalone", f"--nproc_per_node={tp * pp * dp}", os.path.abspath(__file__),
               "--_count-worker", out, "--", *argv]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return False
        ranks = []
        for name in sorted(os.listdir(out)):
            with open(os.path.join(out, name)) as f:
                ranks.append(json.load(f))
    keeps = [MSLGSchedule(m.seq, m.ltd_start, m.ltd_step, m.ltd_ramp_iters).kept_length(t) for t in range(CHECK_ITERS)]
    ok, printed = True, set()
    print(f"check: tiny GPT L={m.num_layers} h={m.hidden} s={m.seq} b={m.micro_batch} G={m.global_batch} "
          f"r={'/'.join(map(str, keeps))} in layers {m.ltd_layers}, tp x pp x dp = {tp} x {pp} x {dp}, "
          f"{' '.join(nx.flags() + list(extra)) or 'fp32'}, {CHECK_ITERS} iterations; payload bytes per "
          "iteration (their mean; the sums must agree exactly), counted / model")
    for r in sorted(ranks, key=lambda x: (x["pp_rank"], x["tp_rank"], x["dp_rank"])):
        k, c, d = r["pp_rank"], r["tp_rank"], r["dp_rank"]
        model = collections.Counter()  # the three iterations' sum: exact integers, r_t and the draw per iteration
        for t, keep in enumerate(keeps):
            rows = routed_rows(m, tp, pp, dp, k, c, d, t, keep) if sp else (0, 0)
            volume = stage_volume(m, nx, tp, pp, dp, k, keep, dp_padding=r["padding"], sp=sp, a2a_rows=rows)
            model.update({name: volume[name]["payload"] for name in CHECKED})
        cells = []
        for name in CHECKED:
            counted, want = r["counts"].get(name, 0), model[name]
            ok &= counted == want
            if want or counted:
                cells.append(f"{name} {counted / CHECK_ITERS:,.0f} / {want / CHECK_ITERS:,.0f}")
        extra_counts = {n: v for n, v in r["counts"].items() if n not in CHECKED}
        ok &= not extra_counts
        pad = f" (padding {r['padding']} el.)" if nx.distributed_optimizer else ""
        who = f"stage {k}" + (f" tp {c} dp {d}" if sp else "")
        line = (f"  {who}{pad}: " + ", ".join(cells) + (f"  UNMODELLED {extra_counts}" if extra_counts else ""))
        if line not in printed:  # without SP the tp * dp ranks of a stage normally agree: print each line once
            print(line)
            printed.add(line)
    print("check: " + ("counted collectives equal the model" if ok else "MISMATCH"))
    return ok


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--_count-worker":
        _count_worker(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON (every stage's breakdown) instead of tables")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: bf16 parameters and activations, fp32 gradient buffers (the recipe); fp32: all 4 bytes")
    p.add_argument("--grad-reduce-in-bf16", action="store_true", help="bf16 gradient buffers (DP traffic 2 bytes)")
    p.add_argument("--fp32-residual-connection", action="store_true", help="fp32 residual stream: PP p2p 4 bytes")
    p.add_argument("--use-distributed-optimizer", action="store_true",
                   help="DP reduce-scatter of grads + all-gather of parameters instead of the all-reduce")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="tables of TP traffic with and without sequence parallelism, and random-LTD's all-to-alls "
                        "(with --check: only the sequence-parallel runs)")
    p.add_argument("--shape", choices=["1.3b", "13b"], default="1.3b",
                   help="13b: a 13B-shaped GPT at TP = 8 (with --sequence-parallel)")
    p.add_argument("--check", action="store_true",
                   help="count the collectives of tiny 8-rank gloo runs and compare them with the model")
    args = p.parse_args()
    if args.precision == "fp32" and (args.grad_reduce_in_bf16 or args.fp32_residual_connection):
        p.error("--grad-reduce-in-bf16 and --fp32-residual-connection need --precision bf16")
    if args.shape == "13b" and not args.sequence_parallel:
        p.error("--shape 13b goes with --sequence-parallel")
    nx = BF16 if args.precision == "bf16" else FP32
    nx = replace(nx, grad=2 if args.grad_reduce_in_bf16 else nx.grad,
                 residual=4 if args.fp32_residual_connection else nx.residual,
                 distributed_optimizer=args.use_distributed_optimizer)
    if args.check:
        return 0 if check(nx, sequence_parallel_only=args.sequence_parallel) else 1
    if args.sequence_parallel:
        m, layouts = (SHAPE_13B, LAYOUTS_13B) if args.shape == "13b" else (ModelShape(), LAYOUTS)
        result = compute_sp(m, nx, layouts, sp_keeps(m))
        print(json.dumps(result, indent=1) if args.json else sp_markdown(result))
        return 0
    result = compute(ModelShape(), nx)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
