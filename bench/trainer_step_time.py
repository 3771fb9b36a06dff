"""Step time of the real trainer on CPU: activation recomputation, and the distributed optimizer on gloo.

Named for what it times, the trainer's `train_step` (`elapsed_ms_per_iteration` of `pretrain_gpt_ltd.py
--log-json`: forward, backward, gradient reduction, optimizer step), to tell it apart from
`ltd_step_time.py`, which times the model alone. Three parts, one small GPT (4 layers, h 256, 8 heads,
s 256, vocab 8000, --bf16, dropout 0, mock data, micro batch 2, 2 micro-batches per DP rank). Dropout is
off because on the CPU its Bernoulli draws alone are a third of the forward (one thread, bf16), a cost a
GPU does not have, and attention dropout also moves SDPA off its fused kernel. Every process runs one
thread: on a shared 2-core machine a 2-thread process was seen to slow down 10x while another job held a
core (each parallel region waits for its descheduled thread); a 1-thread process loses only its share.

 1. Recomputation, one process: none, `--recompute-granularity full --recompute-method
    uniform --recompute-num-layers 1`, and `--recompute-activations` (selective: core attention).
    Full recomputation reruns every layer's forward in backward, so it should cost one more forward.
    Expected step ratios, from forward and forward+backward times of the same model measured here
    in-process, per micro-batch:
        naive  (fwd + bwd + fwd) / (fwd + bwd)           one more whole-model forward (autograd on)
        stack  (step + M * fwd_stack_nograd) / step      what the code does: only the layers are checkpointed
                                                         (not the embedding, LM head and loss), and the
                                                         checkpoint's first pass runs without autograd
                                                         (saving nothing), while the rerun in backward
                                                         replaces the usual graph-building pass; M
                                                         micro-batches per step
    With less noise than whole trainer runs, the model's forward+backward alone is also timed in-process
    for each setting (same weights, alternating rounds).
 2. Data parallelism under torchrun, gloo over loopback, one thread per rank (dp=4 oversubscribes 2
    cores), dp 1 (part 1's "none": the compute alone), 2 and 4: plain DDP (all-reduce of the fp32
    main_grad buffer), `--use-distributed-optimizer` (reduce-scatter of fp32 grads + all-gather of bf16
    parameters), and the
    latter with `--overlap-grad-reduce --overlap-param-gather`, with the default bucket size (40M
    elements: the whole 5.3M-parameter model is one bucket, launched only when its last gradient is in)
    and with `--ddp-bucket-size 1000000` (4 buckets, the first three launched during backward).
 3. The collectives alone, torch.distributed on gloo with the same ranks and buffer size (the model's
    parameter count padded to lcm(dp, 128), as the distributed optimizer pads it): all-reduce of fp32
    (plain DDP), reduce-scatter of fp32 + all-gather of bf16 (distributed optimizer), and all-reduce of
    bf16 (`--grad-reduce-in-bf16`). Ring algorithms send 2(d-1)/d x 4 bytes per element for the first,
    (d-1)/d x (4 + 2) for the second (comm_volume.py).

Method: every trainer run logs every iteration; the first --skip iterations are warm-up, the median of the
rest is reported, and runs are repeated --repeats times in rotating order (median of the medians) because
other jobs on the machine make single runs drift. The 1-minute load average before each run is recorded.
Collectives: --reps timed repetitions after 2 warm-up ones, ranks lined up by a barrier before each, the
median of rank 0's wall time.

    python bench/trainer_step_time.py                       # ~3-4 min on 2 cores
    python bench/trainer_step_time.py --repeats 1 --iters 10 --markdown /tmp/step_time.md
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "256",
         "--max-position-embeddings", "256", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8000",
         "--mock-data", "--num-workers", "0", "--lr", "1e-4", "--log-interval", "1", "--eval-iters", "0", "--bf16",
         "--hidden-dropout", "0", "--attention-dropout", "0"]
MICRO_BATCH, MICRO_PER_RANK = 2, 2
RECOMPUTE = {
    "none": [],
    "full, uniform, 1 layer": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                               "--recompute-num-layers", "1"],
    "selective (--recompute-activations)": ["--recompute-activations"],
}
DP_SIZES = (2, 4)
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
DDP = {
    "plain DDP (all-reduce)": [],
    "distributed optimizer": ["--use-distributed-optimizer"],
    "distributed optimizer + overlaps": ["--use-distributed-optimizer", *OVERLAP],
    "distributed optimizer + overlaps, 1M buckets": ["--use-distributed-optimizer", *OVERLAP,
                                                     "--ddp-bucket-size", "1000000"],
}


def model_argv(dp: int, iters: int) -> list[str]:
    return MODEL + ["--micro-batch-size", str(MICRO_BATCH), "--global-batch-size",
                    str(MICRO_BATCH * MICRO_PER_RANK * dp), "--train-iters", str(iters)]


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def torchrun() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return path if os.path.exists(path) else "torchrun"


def run_trainer(argv: list[str], ranks: int, threads: int, skip: int, out: str) -> dict:
    """One pretrain_gpt_ltd.py run; {"ms": median ms per iteration after `skip`, "load": load before}."""
    log = os.path.join(out, f"run{len(os.listdir(out))}.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": REPO}
    script = os.path.join(REPO, "pretrain_gpt_ltd.py")
    launch = ([sys.executable, script] if ranks == 1 else
              [torchrun(), "--standalone", f"--nproc_per_node={ranks}", script])
    if ranks > 1:
        argv = argv + ["--distributed-backend", "gloo"]
    load = loadavg()
    proc = subprocess.run(launch + argv + ["--log-json", log], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    if proc.returncode:
        sys.exit(f"FAILED ({' '.join(argv)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    times = [r["elapsed_ms_per_iteration"] for r in records if "lm_loss" in r and r["iteration"] > skip]
    assert times, f"no iterations after the {skip} skipped in {log}"
    return {"ms": statistics.median(times), "load": load}


def each(runs: list, key: str) -> str:
    return ", ".join(f"{r[key]:.1f}" for r in runs)


def rotate(names: list, repeats: int):
    """(repeat, name) in rotating order, so slow drift of the machine spreads over every configuration."""
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            yield rep, name


# ---- part 1: forward / forward+backward of the same model, in-process ----------------------------------

def forward_times(reps: int) -> dict:
    """Median ms per micro-batch, in this process: whole-model and layer-stack forward (with and without
    autograd), and forward+backward of the model built with each RECOMPUTE setting (same weights, timed
    in alternating rounds), without the trainer around it."""
    import torch

    from megatron.core.models.gpt import GPTModel
    from megatron.core.tokenizer import build_tokenizer, tokenizer_config_from_args
    from megatron.training.arguments import parse_args
    from megatron.training.config import resolve_config

    torch.set_num_threads(1)

    def build(extra):  # the trainer's model for these flags, cast as the trainer casts it
        flags = parse_args(model_argv(1, 1) + extra)
        config = resolve_config(flags, build_tokenizer(tokenizer_config_from_args(flags)).vocab_size, world_size=1)
        return GPTModel(config.model, seed=config.training.seed).to(config.training.params_dtype).train()

    models = {name: build(extra) for name, extra in RECOMPUTE.items()}
    model = models["none"]
    cfg = model.config
    b, s = MICRO_BATCH, cfg.seq_length
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1))  # [b, s + 1]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [b, s]
    position_ids = torch.arange(s).expand(b, s)  # [b, s]
    hidden = model.embedding(inputs, position_ids).detach().requires_grad_()  # [b, s, h], the stack's input

    def fwd():
        return model(inputs, position_ids, labels).mean()  # [] (graph built, then dropped)

    def stack():
        return model.decoder(hidden, position_ids=position_ids)  # [b, s, h]

    def stack_nograd():  # the reentrant checkpoint's first pass
        with torch.no_grad():
            return model.decoder(hidden, position_ids=position_ids)  # [b, s, h]

    def fwd_bwd(m):
        def run():
            m(inputs, position_ids, labels).mean().backward()
            m.zero_grad(set_to_none=True)
        return run

    fns = {"fwd": fwd, "fwd_stack": stack, "fwd_stack_nograd": stack_nograd,
           **{("fwd_bwd", name): fwd_bwd(m) for name, m in models.items()}}
    times = {k: [] for k in fns}
    for rnd in range(reps + 1):  # round 0 is warm-up; one call of each per round, so drift hits all alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[k].append(time.perf_counter() - t0)
    out = {k: 1e3 * statistics.median(v) for k, v in times.items() if not isinstance(k, tuple)}
    out["fwd_bwd_by_recompute"] = {k[1]: 1e3 * statistics.median(v) for k, v in times.items() if isinstance(k, tuple)}
    out["fwd_bwd"] = out["fwd_bwd_by_recompute"]["none"]
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


# ---- part 3: the collectives alone --------------------------------------------------------------------

def _collectives_worker(numel: int, reps: int, out: str) -> None:
    """On each torchrun rank: time the DP collectives on a [numel] buffer; rank 0 writes the medians."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    d, rank = dist.get_world_size(), dist.get_rank()
    grads32 = torch.randn(numel)  # [N] fp32 main_grad
    grads16 = grads32.bfloat16()  # [N] --grad-reduce-in-bf16
    params = torch.randn(numel).bfloat16()  # [N] bf16 param_data
    shard = numel // d
    rs_out = torch.empty(shard)  # [N/d]
    ops = {
        "all_reduce_fp32": lambda: dist.all_reduce(grads32),
        "reduce_scatter_fp32": lambda: dist.reduce_scatter_tensor(rs_out, grads32),
        "all_gather_bf16": lambda: dist.all_gather_into_tensor(params, params[rank * shard:(rank + 1) * shard]),
        "all_reduce_bf16": lambda: dist.all_reduce(grads16),
    }
    times = {k: [] for k in ops}
    for it in range(reps + 2):  # two warm-up rounds; ops interleaved so drift hits all alike
        for name, op in ops.items():
            dist.barrier()
            t0 = time.perf_counter()
            op()
            if it >= 2:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({k: 1e3 * statistics.median(v) for k, v in times.items()}, f)
    dist.destroy_process_group()


def collectives(dp: int, numel: int, reps: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"collectives_dp{dp}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [torchrun(), "--standalone", f"--nproc_per_node={dp}", os.path.abspath(__file__),
           "--_collectives-worker", str(numel), str(reps), out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if proc.returncode:
        sys.exit(f"FAILED (collectives dp={dp}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


# ---- the whole run --------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_collectives-worker":
        _collectives_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=10, help="training iterations per run")
    p.add_argument("--skip", type=int, default=3, help="warm-up iterations left out of the median")
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration, in rotating order")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each collective and forward")
    p.add_argument("--markdown", help="also write the tables (with command and machine) to this file")
    args = p.parse_args()
    assert args.iters > args.skip, "--iters must exceed --skip"
    start = time.perf_counter()
    lines = []

    def emit(*new):
        lines.extend(new)
        print("\n".join(new), flush=True)

    emit(f"Command: `{' '.join(['python', 'bench/trainer_step_time.py', *sys.argv[1:]])}`",
         f"Machine: {machine()}; load average (1 min) at start {loadavg():.2f}.", "")
    with tempfile.TemporaryDirectory() as tmp:
        # 1. recomputation
        fw = forward_times(args.reps)
        M = MICRO_PER_RANK
        results = {name: [] for name in RECOMPUTE}
        for _, name in rotate(list(RECOMPUTE), args.repeats):
            results[name].append(run_trainer(model_argv(1, args.iters) + RECOMPUTE[name], 1, 1, args.skip, tmp))
        base = statistics.median(r["ms"] for r in results["none"])
        naive = (fw["fwd_bwd"] + fw["fwd"]) / fw["fwd_bwd"]
        stack = (base + M * fw["fwd_stack_nograd"]) / base
        emit(f"Recomputation, one process, one thread; per micro-batch (b={MICRO_BATCH}): forward "
             f"{fw['fwd']:.1f} ms (layer stack alone {fw['fwd_stack']:.1f} ms, without autograd "
             f"{fw['fwd_stack_nograd']:.1f} ms), forward+backward "
             f"{fw['fwd_bwd']:.1f} ms; {fw['params'] / 1e6:.2f}M parameters, {M} micro-batches per step.", "",
             "| recompute | trainer ms/iteration | each run | load before | trainer ratio to none | model fwd+bwd "
             "ms, in-process | model ratio | expected, naive (f+b+f)/(f+b) | expected, layer stack without autograd |",
             "|---|---|---|---|---|---|---|---|---|")
        by = fw["fwd_bwd_by_recompute"]
        for name, runs in results.items():
            ms = statistics.median(r["ms"] for r in runs)
            expected = (f"{naive:.3f} | {stack:.3f}" if name.startswith("full") else "— | —")
            emit(f"| {name} | {ms:.1f} | {each(runs, 'ms')} | {each(runs, 'load')} | **{ms / base:.3f}** "
                 f"| {by[name]:.1f} | {by[name] / by['none']:.3f} | {expected} |")

        # 2. data parallelism
        configs = [(dp, name) for dp in DP_SIZES for name in DDP]
        dp_results = {(1, "plain DDP (all-reduce)"): results["none"], **{c: [] for c in configs}}
        for _, (dp, name) in rotate(configs, args.repeats):
            dp_results[(dp, name)].append(run_trainer(model_argv(dp, args.iters) + DDP[name], dp, 1, args.skip, tmp))
        emit("", "Data parallelism, torchrun + gloo, one thread per rank, global batch "
             f"{MICRO_BATCH * MICRO_PER_RANK} x dp (same work per rank):", "",
             "| dp | DDP | ms/iteration | each run | load before | vs plain DDP, same dp | vs dp=1 |",
             "|---|---|---|---|---|---|---|")
        dp1 = statistics.median(r["ms"] for r in dp_results[(1, "plain DDP (all-reduce)")])
        for (dp, name), runs in dp_results.items():
            ms = statistics.median(r["ms"] for r in runs)
            plain = statistics.median(r["ms"] for r in dp_results[(dp, "plain DDP (all-reduce)")])
            emit(f"| {dp} | {name} | {ms:.1f} | {each(runs, 'ms')} | {each(runs, 'load')} | {ms / plain:.3f} "
                 f"| {ms / dp1:.2f} |")

        # 3. the collectives alone
        emit("", f"Collectives alone, torch.distributed on gloo, one thread per rank, median of {args.reps}:", "",
             "| dp | elements | all-reduce fp32 ms | reduce-scatter fp32 ms | all-gather bf16 ms | RS + AG ms | "
             "(RS + AG) / all-reduce | bytes sent per rank, RS + AG / all-reduce | all-reduce bf16 ms |",
             "|---|---|---|---|---|---|---|---|---|")
        for dp in DP_SIZES:
            multiple = math.lcm(dp, 128)
            numel = -(-fw["params"] // multiple) * multiple
            c = collectives(dp, numel, args.reps, tmp)
            pair = c["reduce_scatter_fp32"] + c["all_gather_bf16"]
            emit(f"| {dp} | {numel:,} | {c['all_reduce_fp32']:.1f} | {c['reduce_scatter_fp32']:.1f} | "
                 f"{c['all_gather_bf16']:.1f} | {pair:.1f} | **{pair / c['all_reduce_fp32']:.2f}** | "
                 f"{6 * (dp - 1) / dp * numel / 1e6:.1f} MB / {8 * (dp - 1) / dp * numel / 1e6:.1f} MB | "
                 f"{c['all_reduce_bf16']:.1f} |")
    emit("", f"Total wall time {time.perf_counter() - start:.0f} s; load average (1 min) at the end "
         f"{loadavg():.2f}.")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
