"""Step time of dense vs random-LTD training on one GPTModel, next to the ratio its FLOP count predicts.

Why: random-LTD only pays off if dropping tokens saves the time its FLOP count promises. What it adds
(drawing the kept indices, gathering the kept rows, scattering them back, and the autograd work of both)
is not in any FLOP count, so this script measures

    measured ratio  = median over rounds of (LTD step time / dense step time of the same round)
    predicted ratio = what the model's own FLOP count says (below)

and, separately, the draw and the gather/scatter alone (LTD's own work, as a share of the LTD step), to
see how much of any gap they explain. Targets (issue 15): LTD's own work under 1 % of an LTD step on the
CPU (2 % on a GPU); measured within 3 % of predicted at 12 layers.

Two routings, measured side by side on the same model (`--routing both`, the default):

    new   the trainer's path: every LTD layer's indices for the step drawn at once on the host
          (`RandomLTDPlan.for_iteration`, numpy, int32), rows moved by the gather/scatter autograd pair
          of random_ltd/routing.py that saves only the row numbers and writes the kept rows into the
          residual in place (`forward_layer`)
    old   the code before issue 15, kept here as the reference: the torch draw on the device at first use
          (~85 small int64 kernels), `torch.gather` (saves its whole [b, s, h] input for backward) and an
          out-of-place `Tensor.scatter` (a full copy forward, and again in backward)

A step is forward + masked CE loss + backward + `Optimizer.step()` (AdamW, grad clipping) + zero_grad, on
the trainer's own path at one process: gradients land in `main_grad` buffers (`DataParallelGradSync`, which
communicates nothing at dp = 1) and the optimizer steps from them. `--dtype bf16` is what `--bf16` trains
with: bf16 parameters (`model.to(torch.bfloat16)`), so every activation, the residual stream and the rows
that random-LTD gathers and scatters are bf16; gradients accumulate into fp32 `main_grad` and AdamW steps
fp32 main parameters, which are cast back into the model after each step.
Dense and LTD steps alternate on the same model and optimizer (one round = dense and every r/s, in a
rotating order), after one warm-up round; medians over --steps rounds. Dropout is 0 by default so the
step is the FLOP model's matmuls plus the usual per-token elementwise work.

FLOP model, per step (matmul FLOPs, multiply-add = 2; forward + backward = 3 x forward):
    a layer on n tokens per sample:  2bn(4h^2 + 2hf)   QKV, proj, fc1, fc2 (fc1 is 2f wide with SwiGLU)
                                   + 2bn^2 h           causal attention: QK^T and AV, half the n x n square
    LM head and loss:                2bshV
LTD layers (1..L-2) see n = r; layers 0 and L-1, embeddings, head and loss see n = s.
Optimizer: AdamW is memory-bound, so a FLOP count (~15 FLOPs/param) would make it look free; instead its
time is measured in every step and treated as the same fixed cost in dense and LTD:
    predicted = (t_opt + t_model * F_ltd / F_dense) / (t_opt + t_model),   t_model = t_dense - t_opt

Usage:
    python bench/ltd_step_time.py                       # CPU default: ~3 min fp32 on 2 cores (both routings)
    python bench/ltd_step_time.py --layers 12 --seq 512 --keep-fractions 0.25 --profile   # where time goes
    python bench/ltd_step_time.py --device cuda --dtype bf16 --hidden 2048 --heads 16 --seq 2048 \
        --layers 4,8 --batch 4 --keep-fractions 0.25,0.5,0.75 --steps 15
"""

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.distributed import DataParallelGradSync
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from megatron.core.random_ltd import RandomLTDPlan, RandomLTDState, forward_layer, routing
from megatron.core.transformer.config import TransformerConfig

SEED = 1234


def ints(text):
    return [int(x) for x in text.split(",")]


def floats(text):
    return [float(x) for x in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=ints, default=[4, 12])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=ints, default=[256, 512])
    p.add_argument("--keep-fractions", type=floats, default=[0.25, 0.5, 0.75], help="r/s values")
    p.add_argument("--routing", choices=["new", "old", "both"], default="both",
                   help="LTD steps with the current routing, the one before issue 15, or both (module docstring)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each variant per round)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = bf16 parameters and activations, fp32 gradient buffers and main parameters")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--profile", action="store_true",
                   help="per (L, s): torch.profiler op table of one dense and one LTD step at the smallest r")
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="CPU: do not pin glibc's mmap/trim thresholds (see keep_freed_memory)")
    p.add_argument("--markdown", help="also write the table (with command and machine) to this file")
    return p.parse_args(argv)


class Clock:
    """Wall-clock seconds, synchronising the GPU first so queued kernels are counted where they belong."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def step_flops(L, h, f, s, b, V, keep, ltd_layers, swiglu=False):
    """Training matmul FLOPs of one step (3 x forward); keep=None means dense."""
    def layer(n):
        return 2 * b * n * (4 * h * h + (3 if swiglu else 2) * h * f) + 2 * b * n * n * h
    fwd = sum(layer(keep if (keep is not None and i in ltd_layers) else s) for i in range(L))
    return 3 * (fwd + 2 * b * s * h * V)


def identity_layer(part, position_ids=None, padding_mask=None):
    return part


def old_run_layer_on_kept(layer, hidden, idx, position_ids=None, padding_mask=None, inplace=False):
    """The routing before issue 15: torch.gather + out-of-place Tensor.scatter (module docstring)."""
    b, s, h = hidden.shape
    idx = idx.long()
    rows = idx.unsqueeze(-1).expand(-1, -1, h)  # [b, r, h]
    part = torch.gather(hidden, 1, rows)  # [b, r, h]
    pos = idx if position_ids is None else torch.gather(position_ids, 1, idx)  # [b, r]
    pad = None if padding_mask is None else torch.gather(padding_mask, 1, idx)  # [b, r]
    return hidden.scatter(1, rows, layer(part, position_ids=pos, padding_mask=pad))  # [b, s, h]


class FixedLength:
    """A schedule keeping r tokens at every iteration (the plan asks only `kept_length`)."""

    def __init__(self, keep):
        self.keep = keep

    def kept_length(self, iteration):
        return self.keep


def ltd_state(how, b, s, keep, ltd_layers, iteration, device):
    """The step's RandomLTDState: new = drawn by the trainer's plan (host, int32, copied to the device);
    old = the torch draw on the device at the first `indices_for` (as before issue 15)."""
    if how == "new":
        plan = RandomLTDPlan(SEED, s, FixedLength(keep), frozenset(ltd_layers), b, 0, 1)
        return plan.for_iteration(iteration, 1, device)[0]
    return RandomLTDState(SEED, iteration, torch.arange(b, device=device), keep, frozenset(ltd_layers))


def with_routing(how):
    """Context in which the block routes kept tokens the `how` way ("new": as the code is)."""
    if how == "new":
        return contextlib.nullcontext()
    return mock.patch.object(routing, "run_layer_on_kept", old_run_layer_on_kept)


def time_overhead(b, s, h, keep, ltd_layers, device, dtype, reps, clock, how):
    """Median (draw, gather+scatter fwd+bwd) seconds per step for all LTD layers, with an identity layer.

    The rows moved are the residual stream's, in the parameter dtype (as in the model); the layers are
    chained through `forward_layer` as in the block, so the new routing writes in place from the second.
    """
    x0 = torch.randn(b, s, h, device=device, dtype=dtype, requires_grad=True)  # [b, s, h]
    grad = torch.randn(b, s, h, device=device, dtype=dtype)  # [b, s, h]
    draws, moves = [], []
    for it in range(reps + 1):
        t0 = clock()
        state = ltd_state(how, b, s, keep, ltd_layers, 10_000 + it, device)
        for layer in sorted(ltd_layers):
            state.indices_for(layer, s)
        t1 = clock()
        x = x0
        with with_routing(how):
            for layer in sorted(ltd_layers):
                x = forward_layer(identity_layer, x, layer, state)  # [b, s, h]
        x.backward(grad.clone())  # the new routing writes into the incoming gradient
        t2 = clock()
        x0.grad = None
        if it:  # the first repetition is warm-up
            draws.append(t1 - t0)
            moves.append(t2 - t1)
    return statistics.median(draws), statistics.median(moves)


def bench_config(args, L, s, device, clock):
    """Rows (one per r/s) for one (L, s): alternating dense/LTD steps on one model."""
    torch.manual_seed(SEED)
    h, b = args.hidden, args.batch
    cfg = TransformerConfig(num_layers=L, hidden_size=h, num_attention_heads=args.heads, seq_length=s,
                            vocab_size=args.vocab, hidden_dropout=args.dropout, attention_dropout=args.dropout)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = GPTModel(cfg).to(device, dtype).train()  # as the trainer: the whole model in the parameter dtype
    grad_sync = DataParallelGradSync(model.parameters(), grad_dtype=torch.float32)  # fp32 main_grad; dp = 1
    opt = Optimizer(model, OptimizerConfig(lr=1e-4), grad_sync)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, args.vocab, (b, s + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(s, device=device).expand(b, s)
    loss_mask = torch.ones(b, s, device=device)
    loss_mask[:, -s // 8:] = 0  # masked tail, as for a document cut by the sequence boundary
    ltd_layers = frozenset(range(1, L - 1))
    keeps = [max(1, round(fr * s)) for fr in args.keep_fractions]
    hows = ["new", "old"] if args.routing == "both" else [args.routing]
    iteration = 0

    def step(variant):
        """One step; variant None (dense) or (r, "new" | "old"). The draw is inside the timed step."""
        nonlocal iteration
        t0 = clock()
        ltd = None if variant is None else ltd_state(variant[1], b, s, variant[0], ltd_layers, iteration, device)
        with with_routing("new" if variant is None else variant[1]):
            loss = model(inputs, position_ids, labels, ltd=ltd)  # [b, s] fp32 (CE on fp32 logits)
            loss = (loss * loss_mask).sum() / loss_mask.sum()
            loss.backward()  # hooks add each .grad into the fp32 main_grad
        grad_sync.finish_grad_sync()  # nothing to reduce at dp = 1
        t1 = clock()
        opt.step()
        opt.zero_grad()
        t2 = clock()
        iteration += 1
        return t2 - t0, t2 - t1

    variants = [None] + [(keep, how) for keep in keeps for how in hows]
    times = {v: [] for v in variants}
    opt_times = []
    for rnd in range(args.steps + 1):  # round 0 is warm-up
        k = rnd % len(variants)
        for v in variants[k:] + variants[:k]:
            total, t_opt = step(v)
            if rnd:
                times[v].append(total)
                opt_times.append(t_opt)
    if args.profile:
        profile_steps(step, (keeps[0], hows[0]), device)

    t_dense, t_opt = statistics.median(times[None]), statistics.median(opt_times)
    f = cfg.ffn_hidden_size
    f_dense = step_flops(L, h, f, s, b, args.vocab, None, ltd_layers)
    rows = []
    for keep, how in variants[1:]:
        t_ltd = statistics.median(times[keep, how])
        flop_ratio = step_flops(L, h, f, s, b, args.vocab, keep, ltd_layers) / f_dense
        t_model = t_dense - t_opt
        predicted = (t_opt + t_model * flop_ratio) / t_dense
        draw, move = time_overhead(b, s, h, keep, ltd_layers, device, dtype, max(3, args.steps), clock, how)
        # Ratio of each LTD step to the dense step of the same round: robust to slow drift in machine load.
        paired = statistics.median(a / d for a, d in zip(times[keep, how], times[None]))
        rows.append({"L": L, "h": h, "s": s, "r": keep, "routing": how, "params": n_params, "dense": t_dense,
                     "ltd": t_ltd, "opt": t_opt, "measured": paired, "flop_ratio": flop_ratio,
                     "predicted": predicted, "draw": draw, "move": move, "tflops": f_dense / t_model / 1e12})
    return rows


def profile_steps(step, keep, device, reps=3, top=14):
    """Print where a dense and an LTD step spend their time: per-operator self time, median of `reps`."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    runs = {None: [], keep: []}
    for _ in range(reps):
        for v, per_step in runs.items():
            with profile(activities=acts) as prof:
                step(v)
            per_step.append({e.key: getattr(e, attr) / 1e3 for e in prof.key_averages()})
    ops = {op for r in runs.values() for d in r for op in d}
    med = {v: {op: statistics.median(d.get(op, 0.0) for d in r) for op in ops} for v, r in runs.items()}
    print(f"\n| op (self time, median of {reps}) | dense ms | LTD r={keep} ms |\n|---|---|---|")
    for op in sorted(ops, key=lambda o: -max(med[None][o], med[keep][o]))[:top]:
        print(f"| {op} | {med[None][op]:.1f} | {med[keep][op]:.1f} |")
    print(f"| all ops | {sum(med[None].values()):.1f} | {sum(med[keep].values()):.1f} |\n", flush=True)


HEADER = ("| L | h | s | r | r/s | routing | dtype | params | dense ms/step | LTD ms/step | measured ratio | "
          "FLOP ratio (model) | predicted ratio (+opt) | difference | draw ms | gather/scatter ms | "
          "draw+g/s % of LTD step |")


def format_row(r, dtype):
    diff = r["measured"] - r["predicted"]
    return (f"| {r['L']} | {r['h']} | {r['s']} | {r['r']} | {r['r'] / r['s']:.2f} | {r['routing']} | {dtype} | "
            f"{r['params'] / 1e6:.1f}M | {r['dense'] * 1e3:.1f} | {r['ltd'] * 1e3:.1f} | "
            f"**{r['measured']:.3f}** | {r['flop_ratio']:.3f} | {r['predicted']:.3f} | "
            f"{diff:+.3f} ({diff / r['predicted'] * 100:+.1f} %) | {r['draw'] * 1e3:.2f} | "
            f"{r['move'] * 1e3:.2f} | {(r['draw'] + r['move']) / r['ltd'] * 100:.1f} |")


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def keep_freed_memory(args):
    """CPU: re-run this script with glibc told to keep freed memory instead of returning it to the OS.

    By default glibc unmaps large freed blocks (logits, activations) and the next step page-faults them
    back in: at L=12, s=512, b=8 that is ~1 s of system time per dense step, growing faster than the
    footprint, which made dense steps look slower per FLOP than LTD steps (measured ratio ~18 % below the
    prediction). Pinning both thresholds removes the faults; the thresholds are read at process start,
    hence the re-exec.
    """
    if args.device != "cpu" or args.glibc_malloc_defaults or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(32 << 30)
    os.execv(sys.executable, [sys.executable] + sys.argv)


def main(argv=None):
    args = parse_args(argv)
    if argv is None:
        keep_freed_memory(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock = Clock(device)
    command = "python " + " ".join(["bench/ltd_step_time.py"] + (sys.argv[1:] if argv is None else argv))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    lines = [f"Command: `{command}`", f"Machine: {machine(device)}", f"Batch {args.batch}, vocab {args.vocab}, "
             f"{args.heads} heads, dropout {args.dropout}, medians of {args.steps} alternating rounds"
             + (f"; glibc {malloc}." if device.type == "cpu" else "."), "",
             HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    print("\n".join(lines), flush=True)
    start = time.perf_counter()
    for L in args.layers:
        for s in args.seq:
            for row in bench_config(args, L, s, device, clock):
                lines.append(format_row(row, args.dtype))
                print(lines[-1], f"  [dense model {row['tflops']:.3f} TFLOP/s, opt "
                      f"{row['opt'] * 1e3:.1f} ms]", flush=True)
    lines.append(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")
    print(lines[-1])
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
