"""Memory per rank, computed and measured: model state (parameters, gradient buffers, fp32 main parameters,
Adam state) and the activations one transformer layer saves for backward, for the trainer's own flags.

Why both: the computed side answers "does the 13B recipe fit on 80 GB at TP=8, dp=8?" without a cluster;
the measured side (`--measure`, a small model on this machine's CPU, one gloo process per rank) checks
that the formulas describe what this code actually allocates, storage by storage.

Model state, per rank (`DataParallelGradSync`, `Optimizer`; layout rules of `param_and_grad_buffer.py`):

    parameters       N·βp, or with the distributed optimizer the padded flat `param_data` buffer
    gradient buffer  padded buffer length · βg (no padding without the distributed optimizer)
    fp32 main        16-bit parameters only: 4 bytes per owned element (all N, or this DP rank's shard)
    fp32 grad copy   16-bit gradients only: `Optimizer.step` reads them through an fp32 copy (4 per owned
                     element), alive during the step (a peak; freed before evaluation and saving)
    Adam m, v        8 bytes per owned element

N is this rank's parameter count (TP-sharded, one pipeline stage); the largest stage is reported.
Owned elements of a DP rank: the parameter elements inside its [n_b/dp] slice of every bucket, after
parameter starts are aligned to 64 elements and bucket ends padded to a multiple of lcm(dp, 128).

Activations per layer and micro-batch, on n tokens (n = s; n = r in a random-LTD layer), as this code
saves them (each term is a tensor autograd keeps; storages shared by views counted once), in three parts:
sequence, tensor (TP-split + attention) and routing:

    sequence     b·n·h·(4β + 2μ) + 4·b·n·σ   LN1 input, LN1 output (= QKV input), LN2 input, LN2 output
                 (/t with sequence parallel)  (= fc1 input); two hidden-dropout masks; mean, rstd of 2 norms:
                                              the norms, dropouts and residual stream, replicated over TP;
                                              --sequence-parallel keeps this rank's [b, n/t, h] chunk of
                                              each (the column-parallel GEMMs save their input's chunk)
    TP-split     b·n·(4h + 2f)·β / t          QKV output (q, k, v are views of it), attention output
                                              (= proj input), fc1 output (= GELU input), GELU output;
                                              SwiGLU: 4f instead of 2f (fc1's [gate; up], silu(gate), product)
    attention    flash-type kernel: 4·b·(a/t)·n   the fp32 log-sum-exp; q, k, v and out are the tensors above
                 CPU math path (attention dropout > 0 on the CPU): 12·b·(a/t)·n² for fp32 scores,
                 dropout mask and dropped probabilities, + b·n·(12 − 3β)·h/t (fp32 copies of q, k, v
                 replace the QKV output)
    routing      4·b·r                        LTD layer: the int32 row numbers [b·r] that random_ltd/routing.py's
                                              gather/scatter pair saves (once for both); nothing of [b, s, h]
                 12·b·r/t                     LTD layer, sequence parallel: the int32 route of
                                              random_ltd/sequence_parallel.py (the plan makes it with the
                                              draw), held by its autograd nodes and the micro-batch's
                                              random-LTD state (not a saved tensor): sample and chunk
                                              position of each kept token in this rank's chunk, slot of
                                              each of its b·r/t list
                                              entries. Chunks hold a random share of the kept tokens, so
                                              this is the mean over the TP ranks (exact: together they send
                                              b·r). No gather: nothing of [b, s, h] is kept

    selective recompute: no attention term (the checkpoint keeps q, k, v, i.e. the QKV output)
    full recompute (uniform, 1 layer per checkpoint): β·b·s·h, the layer's input, LTD layer or not
                 (sequence parallel: β·b·s·h/t, its chunk); counted in the sequence part

β = bytes of the parameter dtype; μ = dropout-mask bytes (cuda: 1, the fused kernel's bool mask; cpu: β,
the mask is a tensor of the input's dtype; 0 without hidden dropout); σ = bytes of a norm statistic
(cuda: 4; cpu: β). The index term is each LTD layer's own: it builds its row numbers from the kept
indices. With f = 4h, β = 2 on cuda: 10·sbh + 24·sbh/t (+ small per-token terms), Korthikanti
et al.'s "TP + selective recompute" row, which flash attention reaches without recomputing anything:
their 5·a·s²·b/t of scores is never materialised; with sequence parallelism 34·sbh/t, their "TP + SP +
selective" row. Covered: GPT, LayerNorm, GELU or SwiGLU, multi-head attention, learned or no position
embedding; other models are measured only. The cpu variant is checked exactly by `--measure` (and
tests/functional/test_bench_memory.py). The cuda one is derived from the saved tensors of torch's flash
kernel (fp32 on CUDA runs the memory-efficient kernel, whose log-sum-exp is padded to 32 tokens), fused
dropout and LayerNorm, and has not been measured on a GPU.

    python bench/memory.py --world-size 8 --kept-length 128 --all-modes --num-layers 24 --hidden-size 2048 \
        --num-attention-heads 16 --seq-length 2048 --micro-batch-size 4 --bf16
    python bench/memory.py --measure --world-size 2 --use-distributed-optimizer --kept-length 16 \
        --num-layers 3 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 --bf16
    python bench/memory.py --measure --tensor-model-parallel-size 2 --sequence-parallel --kept-length 16 \
        --num-layers 3 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2

`--measure` attributes every saved storage to a layer and to one of the three parts by where it was saved:
inside a norm, a column-parallel GEMM (its input is a norm's output) or the layer's own code (dropout,
residual) is the sequence part; elsewhere inside attention or the MLP the TP-split part; between layers the
routing part (with full recompute: the checkpoint's input, the sequence part). With --sequence-parallel it
also measures the same run without it and prints each part's ratio, 1/t for the sequence part.

Trainer flags not given get harmless defaults (--lr, --mock-data, --train-iters 1, GPT-2's 50257-token
vocabulary through --tokenizer-type NullTokenizer --vocab-size 50256). GB = 1e9 bytes, MB = 1e6.

Glossary: b micro batch, s sequence, r kept tokens, h hidden, f ffn hidden, a heads, t/tp tensor parallel,
pp pipeline stages, dp/d data parallel, N parameters on this rank, βp/βg parameter/gradient bytes.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer.optimizer import ADAM_KEYS  # noqa: E402
from megatron.core.random_ltd.config import default_ltd_layers  # noqa: E402
from megatron.core.random_ltd.schedule import MSLGSchedule  # noqa: E402
from megatron.core.tokenizer import build_tokenizer, tokenizer_config_from_args  # noqa: E402
from megatron.training.arguments import parse_args  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402
from megatron.training.config import RunConfig, resolve_config  # noqa: E402
from megatron.training.pretrain import set_seed  # noqa: E402
from megatron.training.trainer import Trainer  # noqa: E402
from bench.saved_bytes import PARTS, SavedTensorMeter, storages as _storages  # noqa: E402
from pretrain_gpt_ltd import forward_step  # noqa: E402

GB, MB = 1e9, 1e6
PARAM_ALIGN, BUCKET_ALIGN = 64, 128  # Megatron's distributed-optimizer padding (param_and_grad_buffer.py)
MEASURE_MAX_PARAMS = 50_000_000  # --measure trains the whole model once per recompute mode on the CPU
MEASURE_MAX_WORLD = 16
STATE_KEYS = ("params", "grads", "main", "grad_copy", "adam")
STATE_NAMES = ("params", "grad buffer", "fp32 main", "fp32 grad copy", "Adam m+v")
RECOMPUTE = ("none", "selective", "full")
PART_NAMES = ("norms, dropout, residual", "attention + MLP (TP-split)", "LTD routing")
# Run modes: (parameter bytes, gradient bytes); Megatron's published bytes per parameter for the same
# (param, grad) dtypes, plain and with the distributed optimizer (docs/source/api-guide/dist_optimizer.md)
MODES = {"fp32": (4, 4), "bf16": (2, 4), "bf16 --grad-reduce-in-bf16": (2, 2), "fp16": (2, 2),
         "fp16 --accumulate-allreduce-grads-in-fp32": (2, 4)}
PUBLISHED = {(2, 2): (20, 4, 16), (2, 4): (18, 6, 12), (4, 4): (16, 8, 8)}  # total, a + b/d


# ---- the run: the trainer's flags, resolved once ------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    config: RunConfig
    kept_length: int  # r
    device: str  # whose kernels the activation formula counts: "cuda" or "cpu"
    ltd_layers: tuple  # the run's LTD set, or the default one when --random-ltd is off

    @property
    def tp(self) -> int:
        return self.config.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.config.parallel.pipeline_model_parallel_size

    @property
    def dp(self) -> int:
        return self.config.parallel.data_parallel_size

    @property
    def sp(self) -> bool:
        return self.config.model.sequence_parallel


def with_sequence_parallel(setup: Setup, on: bool) -> Setup:
    """The same run with --sequence-parallel on or off (same TP)."""
    c = setup.config
    model = dataclasses.replace(c.model, sequence_parallel=on)
    args = MappingProxyType({**c.args, "sequence_parallel": on})
    return dataclasses.replace(setup, config=dataclasses.replace(c, model=model, args=args))


def bench_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Memory per rank (computed; --measure: also measured)",
                       epilog="Every other flag is the trainer's (pretrain_gpt_ltd.py --help).")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: tp x pp, one DP replica)")
    p.add_argument("--kept-length", type=int, default=None,
                   help="r of the random-LTD layers (default: --random-ltd-start-seq-length, 128)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="kernels the activation formula counts (default cuda; cpu with --measure)")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary (default: built from the tokenizer flags)")
    p.add_argument("--all-modes", action="store_true", help="model state in every precision mode")
    p.add_argument("--measure", action="store_true", help="also build, train one step and measure (small models)")
    p.add_argument("--markdown", action="store_true", help="markdown tables (for docs)")
    return p


def _given(argv, *names) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def resolve(argv) -> tuple:
    """(Setup, bench options) from one command line: the bench's options and the trainer's flags."""
    opts, rest = bench_parser().parse_known_args(argv)
    defaults = ["--lr", "1e-4", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50256"]
    if not _given(rest, "--train-iters", "--train-samples", "--train-tokens", "--train-layer-tokens"):
        defaults += ["--train-iters", "1"]
    flags = parse_args(defaults + rest)
    for name, value in (("--world-size", opts.world_size), ("--true-vocab-size", opts.true_vocab_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if opts.true_vocab_size is not None:
        vocab = opts.true_vocab_size
    elif flags.tokenizer_type == "NullTokenizer":
        vocab = flags.vocab_size + 1  # ids 0..N-1 and EOD N
    else:  # as pretrain_gpt_ltd.py does; a missing file is an error naming its flag
        vocab = build_tokenizer(tokenizer_config_from_args(flags)).vocab_size
    world = opts.world_size if opts.world_size is not None else \
        flags.tensor_model_parallel_size * flags.pipeline_model_parallel_size
    config = resolve_config(flags, vocab, world)
    s = config.model.seq_length
    r = opts.kept_length if opts.kept_length is not None else min(config.args["random_ltd_start_seq_length"], s)
    if not 1 <= r <= s:
        raise UserError(f"--kept-length {r} must be in [1, --seq-length {s}]")
    tp = config.parallel.tensor_model_parallel_size
    if config.model.sequence_parallel and r < s and r % tp:
        raise UserError(f"--sequence-parallel splits the kept tokens over the TP ranks: --kept-length {r} is not "
                        f"divisible by --tensor-model-parallel-size {tp}")
    if opts.measure and opts.device == "cuda":
        raise UserError("--measure runs on this machine's CPU (gloo); compare it with --device cpu (the default)")
    device = opts.device or ("cpu" if opts.measure else "cuda")
    ltd = config.run.ltd.ltd_layers(config.model.num_layers) or default_ltd_layers(config.model.num_layers)
    setup = Setup(config, r, device, tuple(ltd))
    _check_tp(setup)
    return setup, opts


def _check_tp(setup: Setup) -> None:
    """The TP splits the model's constructors would refuse, refused here for the meta-device count."""
    m, tp = setup.config.model, setup.tp
    for name, value in (("--num-attention-heads", m.num_attention_heads), ("--num-query-groups", m.num_query_groups),
                        ("--ffn-hidden-size", m.ffn_hidden_size)):
        if value % tp:
            raise UserError(f"{name} {value} is not divisible by --tensor-model-parallel-size {tp}")


# ---- model state, computed ----------------------------------------------------------------------------
def stage_params(setup: Setup, stage: int) -> List[tuple]:
    """(local numel, own bucket) of this stage's parameters on one TP rank, in registration order.

    The stage is built on the meta device at tp = 1 and each parameter's TP tag says whether a rank holds
    numel/tp of it (the trainer's model on a TP rank has exactly these shapes, in this order)."""
    c, tp, pp = setup.config, setup.tp, setup.pp
    per_stage = c.model.num_layers // pp
    with torch.device("meta"):
        model = GPTModel(c.model, stage == 0, stage == pp - 1, stage * per_stage, per_stage)
    tied = pp > 1 and model.share_embeddings and stage in (0, pp - 1)  # its own bucket (trainer._tied_weight)
    out = []
    for name, p in model.named_parameters():
        numel = p.numel() // tp if getattr(p, "tensor_model_parallel", False) else p.numel()
        out.append((numel, tied and name in ("embedding.word_embeddings.weight", "output_layer.weight")))
    return out


def bucket_layout(params: List[tuple], bucket_numel: Optional[int], dp: int, distributed: bool) -> List[tuple]:
    """[(start, end, [(offset, numel), ...])] per bucket: parameters in reverse registration order; with the
    distributed optimizer each start aligned to 64 elements and each bucket end padded to lcm(dp, 128)."""
    multiple = math.lcm(dp, BUCKET_ALIGN) if distributed else 1
    buckets, current, start, offset = [], [], 0, 0

    def close():
        nonlocal current, start, offset
        if current:
            end = -(-offset // multiple) * multiple
            buckets.append((start, end, current))
            current, start, offset = [], end, end

    for numel, alone in reversed(params):
        if alone:
            close()
        if distributed:
            offset = -(-offset // PARAM_ALIGN) * PARAM_ALIGN
        current.append((offset, numel))
        offset += numel
        if alone or (bucket_numel is not None and offset - start >= bucket_numel):
            close()
    close()
    return buckets


def owned_elements(buckets: List[tuple], dp: int, dp_rank: int) -> int:
    """Parameter elements inside DP rank `dp_rank`'s slice of every bucket (padding owns nothing)."""
    total = 0
    for start, end, params in buckets:
        n = (end - start) // dp
        lo, hi = start + dp_rank * n, start + (dp_rank + 1) * n
        total += sum(max(0, min(o + k, hi) - max(o, lo)) for o, k in params)
    return total


def state_bytes(params: List[tuple], bp: int, bg: int, distributed: bool, dp: int, dp_rank: int,
                bucket_numel: Optional[int]) -> Dict[str, int]:
    """Bytes of each model-state quantity on one rank (see the module docstring)."""
    n = sum(k for k, _ in params)
    buckets = bucket_layout(params, bucket_numel, dp, distributed)
    padded = buckets[-1][1] if buckets else 0
    owned = owned_elements(buckets, dp, dp_rank) if distributed else n
    return {"params": (padded if distributed else n) * bp, "grads": padded * bg,
            "main": 4 * owned if bp < 4 else 0, "grad_copy": 4 * owned if bg < 4 else 0, "adam": 8 * owned}


def run_mode(config: RunConfig) -> tuple:
    bp = config.training.params_dtype.itemsize
    return bp, 4 if config.ddp.grad_reduce_in_fp32 else bp


def mode_label(bp: int, bg: int, config: RunConfig) -> str:
    precision = config.training.precision
    return next((k for k, v in MODES.items() if v == (bp, bg) and k.startswith(precision)), precision)


def largest_rank(setup: Setup, bp: int, bg: int, distributed: bool) -> tuple:
    """(stage, dp rank, N, bytes) of the rank with the most model-state bytes."""
    best = None
    for stage in range(setup.pp):
        params = stage_params(setup, stage)
        for d in range(setup.dp if distributed else 1):
            b = state_bytes(params, bp, bg, distributed, setup.dp, d, setup.config.ddp.bucket_size)
            if best is None or sum(b.values()) > sum(best[3].values()):
                best = (stage, d, sum(k for k, _ in params), b)
    return best


# ---- activations, computed ----------------------------------------------------------------------------
def activation_unmodelled(config: RunConfig) -> Optional[str]:
    """Why the formula does not cover this model (None: it does)."""
    m = config.model
    for bad, why in ((m.normalization != "LayerNorm", m.normalization),
                     (m.num_query_groups != m.num_attention_heads, "grouped-query attention"),
                     (m.position_embedding_type == "rope", "RoPE"), (m.fp32_residual_connection, "fp32 residual"),
                     (not m.causal, "BERT")):
        if bad:
            return why
    return None


def layer_parts(setup: Setup, n: int, recompute: str) -> Dict[str, int]:
    """{part: bytes} one layer on n tokens (n < s: a random-LTD layer) saves for backward per micro-batch,
    by PARTS (module docstring); the routing part of a sequence-parallel run is the TP ranks' mean."""
    c = setup.config
    m, b, t = c.model, c.training.micro_batch_size, setup.tp
    s, h, f, a = m.seq_length, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    beta = c.training.params_dtype.itemsize
    chunks = t if setup.sp else 1  # the sequence part's split: [b, n/t, h] per rank
    if recompute == "full":
        return {"sequence": beta * b * s * h // chunks, "tensor": 0, "routing": 0}
    cuda = setup.device == "cuda"
    mu = 0 if m.hidden_dropout == 0 else 1 if cuda else beta
    sigma = 4 if cuda else beta
    ffn = 4 * f if m.swiglu else 2 * f  # SwiGLU: fc1's [gate; up] output, silu(gate), their product
    sequence = (b * n * h * (4 * beta + 2 * mu) + 4 * b * n * sigma) // chunks
    tensor = b * n * (4 * h + ffn) * beta // t
    if recompute == "none":
        if not cuda and m.attention_dropout > 0:  # torch's math path, in fp32
            tensor += 12 * b * (a // t) * n * n + b * n * (12 - 3 * beta) * h // t
        else:
            tensor += 4 * b * (a // t) * n
    routing = 0 if n == s else 12 * b * n // t if setup.sp else 4 * b * n
    return {"sequence": sequence, "tensor": tensor, "routing": routing}


def layer_bytes(setup: Setup, n: int, recompute: str) -> int:
    """Bytes one layer on n tokens (n < s: a random-LTD layer) saves for backward per micro-batch."""
    return sum(layer_parts(setup, n, recompute).values())


def paper_bytes(setup: Setup, recompute: str) -> Optional[float]:
    """Korthikanti et al. Table 2, 16-bit activations, TP t (and SP), dense layer: the reference next to ours.
    Full recompute: their 2·sbh, split by t under sequence parallelism as the checkpointed input is here."""
    c = setup.config
    if c.training.params_dtype.itemsize != 2:
        return None
    m, b, t = c.model, c.training.micro_batch_size, setup.tp
    sbh, a, s, h = m.seq_length * b * m.hidden_size, m.num_attention_heads, m.seq_length, m.hidden_size
    replicated = 10 / t if setup.sp else 10
    return sbh * {"none": replicated + 24 / t + 5 * a * s / (h * t), "selective": replicated + 24 / t,
                  "full": 2 / t if setup.sp else 2}[recompute]


# ---- measured: one training step per recompute mode, one process per rank ----------------------------
def measure_state(trainer, copies: Dict[int, int]) -> Dict[str, int]:
    """The model-state bytes this rank holds at the optimizer step, by storage (`copies`: the fp32 gradient
    copies the step made, recorded before it freed them)."""
    opt, sync = trainer.optimizer, trainer.grad_sync
    params = _storages(trainer.model.parameters())
    grads = _storages(buf.grad_data for buf in sync.buffers)
    main = _storages(m.main for m in opt.mains)
    adam = _storages(st[k] for st in opt.adam.state.values() for k in ADAM_KEYS if k in st)
    return {"params": sum(params.values()), "grads": sum(grads.values()),
            "main": sum(v for k, v in main.items() if k not in params),
            "grad_copy": sum(v for k, v in copies.items() if k not in grads), "adam": sum(adam.values())}


def _measure_rank(setup: Setup, out_dir: str) -> None:
    """On one rank: per recompute mode, build the stage and a Trainer, run one step, record bytes."""
    c, rank = setup.config, dist.get_rank()
    stage, per_stage = ps.get_pipeline_model_parallel_rank(), c.model.num_layers // setup.pp
    result = {"rank": rank, "stage": stage, "tp_rank": ps.get_tensor_model_parallel_rank(),
              "dp_rank": ps.get_data_parallel_rank(), "layers": {}, "outside": {}}
    modes = {"none": (None, None, None), "selective": ("selective", None, None), "full": ("full", "uniform", 1)}
    for name, (granularity, method, k) in modes.items():
        model_config = dataclasses.replace(c.model, recompute_granularity=granularity, recompute_method=method,
                                           recompute_num_layers=k)
        config = dataclasses.replace(c, model=model_config)
        if c.training.fp16:  # a dynamic scale of 2^32 overflows and skips the step; Adam allocates m, v
            config = dataclasses.replace(config, optimizer=dataclasses.replace(c.optimizer, loss_scale=1.0))
        set_seed(c.training.seed)
        model = GPTModel(model_config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                         stage * per_stage, per_stage, seed=c.training.seed)
        trainer = Trainer(config, model, (None, None, None), forward_step)
        meter = SavedTensorMeter(trainer.model, name == "full")
        trainer.forward_step = meter.wrap(forward_step)
        stage_ltd = frozenset(x for x in setup.ltd_layers if stage * per_stage <= x < (stage + 1) * per_stage)
        # iteration 0 keeps exactly r tokens in the LTD layers: r_0 = r, step 1
        trainer.ltd = dataclasses.replace(trainer.ltd, layers=stage_ltd,
                                          schedule=MSLGSchedule(c.model.seq_length, setup.kept_length, 1, 1))
        copies = {}  # the fp32 gradient copies exist during the step only: record them before they go
        drop = trainer.optimizer._drop_grad_copies

        def record_then_drop(opt=trainer.optimizer, drop=drop):
            copies.update(_storages(m.main.grad for m in opt.mains if m.main.grad is not None))
            drop()

        trainer.optimizer._drop_grad_copies = record_then_drop
        _, step, _ = trainer.train_step(_random_batches(c), 0)
        assert not step.skipped, "the measured step was skipped: no optimizer state to measure"
        meter.close()
        layers = meter.by_layer()
        result["outside"][name] = sum(layers.pop("outside", {}).values())
        result["layers"][name] = layers  # {layer: {part: bytes}}
        if name == "none":
            result["state"] = measure_state(trainer, copies)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _random_batches(c: RunConfig):
    g = torch.Generator().manual_seed(c.training.seed)  # the same tokens on every rank
    b, s, v = c.training.micro_batch_size, c.model.seq_length, c.args["true_vocab_size"]
    while True:
        tokens = torch.randint(0, v, (b, s + 1), generator=g)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s),
               "position_ids": torch.arange(s).expand(b, s)}


def _worker(rank: int, world: int, port: int, setup: Setup, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # tiny models; threads only contend with the other ranks
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=2))
    ps.init_distributed("gloo")  # the CPU, also where CUDA is visible
    try:
        ps.initialize_model_parallel(setup.tp, setup.pp)
        _measure_rank(setup, out_dir)
    except UserError as e:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(str(e))
        raise
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def check_measurable(setup: Setup) -> None:
    """--measure runs every rank of the layout as a process on this machine: small models only."""
    world = setup.config.parallel.world_size
    total = setup.tp * sum(sum(k for k, _ in stage_params(setup, st)) for st in range(setup.pp))  # about
    if total > MEASURE_MAX_PARAMS:
        raise UserError(f"--measure trains the model on this machine's CPU: about {total / 1e6:.0f}M parameters "
                        f"is too big (limit {MEASURE_MAX_PARAMS / 1e6:.0f}M); drop --measure for the computed "
                        "tables or give a smaller model")
    if world > MEASURE_MAX_WORLD:
        raise UserError(f"--measure runs one process per rank: --world-size {world} is more than "
                        f"{MEASURE_MAX_WORLD}; measure a smaller layout")


def measure(setup: Setup) -> List[dict]:
    """Every rank's measured bytes (one forked gloo process per rank), in rank order."""
    check_measurable(setup)
    world = setup.config.parallel.world_size
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker, args=(world, port, setup, out_dir), nprocs=world, start_method="fork")
        except mp.ProcessRaisedException:
            errors = sorted(glob.glob(os.path.join(out_dir, "error*.txt")))
            if errors:
                with open(errors[0]) as f:
                    raise UserError(f.read().strip()) from None
            raise
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def computed_for_rank(setup: Setup, result: dict) -> Dict[str, int]:
    """The computed model state of the rank a measurement came from (its stage and DP rank)."""
    bp, bg = run_mode(setup.config)
    return state_bytes(stage_params(setup, result["stage"]), bp, bg, setup.config.ddp.use_distributed_optimizer,
                       setup.dp, result["dp_rank"], setup.config.ddp.bucket_size)


def measured_parts(setup: Setup, results: List[dict], recompute: str) -> tuple:
    """({part: mean bytes} of the dense layers, of the LTD layers) the given ranks (one stage) measured;
    None for a kind they have none of.

    Means over layers (every LTD layer saves the same: its own int32 row numbers, 4·b·r). Means over
    ranks, because under sequence parallelism each TP
    rank's chunk holds a random share of the kept tokens, and so of the route (pass one TP group)."""
    per_stage = setup.config.model.num_layers // setup.pp
    stage = results[0]["stage"]
    assert all(res["stage"] == stage for res in results), "ranks of one stage"
    layers = range(stage * per_stage, (stage + 1) * per_stage)
    out = []
    for ltd in (False, True):
        mine = [res["layers"][recompute].get(str(x), {}) for res in results for x in layers
                if (x in setup.ltd_layers) == ltd]
        out.append({p: sum(m.get(p, 0) for m in mine) / len(mine) for p in PARTS} if mine else None)
    return tuple(out)


def measured_layers(setup: Setup, result: dict, recompute: str) -> tuple:
    """(mean bytes of the dense layers, of the LTD layers) one rank measured; None for a kind it has none of."""
    return tuple(None if x is None else sum(x.values()) for x in measured_parts(setup, [result], recompute))


def first_tp_group(results: List[dict]) -> List[dict]:
    """The ranks of stage 0, DP rank 0: one TP group, where the largest activations are."""
    return [res for res in results if res["stage"] == 0 and res["dp_rank"] == 0]


# ---- printing -----------------------------------------------------------------------------------------
def table(headers, rows, markdown: bool) -> str:
    rows = [[str(x) for x in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*row) for row in rows])


def ratio(x: float, y: float) -> str:
    return "—" if not y else f"{x / y:.4f}" if x / y >= 1e-3 else f"{x / y:.1e}"


def describe(setup: Setup) -> str:
    c, m = setup.config, setup.config.model
    return (f"GPT {m.num_layers} layers, h {m.hidden_size}, ffn {m.ffn_hidden_size}, {m.num_attention_heads} heads, "
            f"s {m.seq_length}, vocab {m.vocab_size} (padded), micro batch {c.training.micro_batch_size}, "
            f"{c.training.precision}; tp {setup.tp} x pp {setup.pp} x dp {setup.dp} = {c.parallel.world_size} ranks"
            f"{', sequence parallel' if setup.sp else ''}")


def state_report(setup: Setup, all_modes: bool, md: bool) -> str:
    d = setup.dp
    mode = run_mode(setup.config)
    modes = MODES.items() if all_modes else [(mode_label(*mode, setup.config), mode)]
    rows, n_rank = [], None
    for label, (bp, bg) in modes:
        for distributed in (False, True):
            stage, dp_rank, n, b = largest_rank(setup, bp, bg, distributed)
            n_rank = n
            total, (pub, x, y) = sum(b.values()), PUBLISHED[(bp, bg)]
            published = f"{pub}" if not distributed else f"{x} + {y}/{d} = {x + y / d:.3g}"
            rows.append([label, f"distributed, dp {d}" if distributed else "plain",
                         *(f"{b[k] / n:.3f}" for k in STATE_KEYS), f"**{total / n:.3f}**" if md else f"{total / n:.3f}",
                         published, f"{total / GB:.2f}"])
    head = (f"Model state per rank (bytes per parameter; GB = 1e9 bytes for N = {n_rank:,} parameters on the "
            f"largest rank: TP-sharded, one pipeline stage)")
    return head + "\n\n" + table(["mode", "optimizer", *STATE_NAMES, "total B/param", "Megatron B/param",
                                  "total GB"], rows, md)


def activation_report(setup: Setup, md: bool) -> str:
    c, m = setup.config, setup.config.model
    b, s, h, r = c.training.micro_batch_size, m.seq_length, m.hidden_size, setup.kept_length
    sbh = s * b * h
    why = activation_unmodelled(c)
    if why is not None:
        return f"Activations: the formula does not cover {why}; use --measure on a small model of this kind"
    dense_n, ltd_n = (sum(1 for x in range(m.num_layers // setup.pp) if (x in setup.ltd_layers) == k)
                      for k in (False, True))
    flight = min(setup.pp, c.training.num_micro_batches)
    rows = []
    for rec in RECOMPUTE:
        dense, ltd = layer_bytes(setup, s, rec), layer_bytes(setup, r, rec)
        paper = paper_bytes(setup, rec)
        stage = [(dense_n + ltd_n) * dense * flight, (dense_n * dense + ltd_n * ltd) * flight]
        rows.append([rec if rec != "full" else "full (uniform, 1 layer)", f"{dense / MB:.1f} ({dense / sbh:.2f} sbh)",
                     f"{ltd / MB:.1f} ({ltd / sbh:.2f} sbh)", "—" if paper is None else f"{paper / MB:.1f} "
                     f"({paper / sbh:.2f} sbh)", *(f"{x / GB:.2f}" for x in stage)])
    head = (f"Activations saved for backward per layer and micro-batch, MB ({setup.device} kernels, "
            f"{c.training.precision}, tp {setup.tp}{' + sequence parallel' if setup.sp else ''}, b {b}, s {s}, "
            f"r {r}); first stage: {dense_n} dense + {ltd_n} LTD layers x {flight} micro-batch(es) in flight "
            f"(embedding and head not included)")
    out = head + "\n\n" + table(["recompute", "dense layer (n = s)", f"LTD layer (n = r = {r})",
                                 "Korthikanti et al. (dense)", "first stage GB, dense", "first stage GB, LTD"],
                                rows, md)
    if not setup.sp:
        return out
    # the same TP without sequence parallelism, part by part
    off, rows = with_sequence_parallel(setup, False), []
    per_layer = {(kind, sp): layer_parts(x, n, "none") for kind, n in (("dense", s), ("LTD", r))
                 for sp, x in ((False, off), (True, setup))}
    for name, key in [*zip(PART_NAMES, PARTS), ("layer", None)]:
        row = [name]
        for kind in ("dense", "LTD"):
            no, yes = (per_layer[kind, sp][key] if key else sum(per_layer[kind, sp].values()) for sp in (False, True))
            row += [f"{no / MB:.1f}", f"{yes / MB:.1f}", ratio(yes, no)]
        rows.append(row)
    dense, ltd = ({sp: sum(per_layer[kind, sp].values()) for sp in (False, True)} for kind in ("dense", "LTD"))
    every_dense = [flight * (dense_n + ltd_n) * dense[sp] for sp in (False, True)]
    with_ltd = [flight * (dense_n * dense[sp] + ltd_n * ltd[sp]) for sp in (False, True)]
    rows.append(["first stage (GB)", *(x for no, yes in (every_dense, with_ltd)
                                       for x in (f"{no / GB:.2f}", f"{yes / GB:.2f}", ratio(yes, no)))])
    t = setup.tp
    return (out + f"\n\nSequence parallelism at tp {t} (recompute none), MB per layer and micro-batch: without and "
            f"with --sequence-parallel, and with / without (1/{t} = {1 / t:.4f})\n\n"
            + table(["part", "dense, TP", "dense, TP + SP", "SP / no SP", f"LTD (r = {r}), TP", "LTD, TP + SP",
                     "SP / no SP"], rows, md))


def measure_report(setup: Setup, results: List[dict], md: bool, baseline: Optional[List[dict]] = None) -> str:
    rows = []
    for res in results:
        comp = computed_for_rank(setup, res)
        for key, name in zip(STATE_KEYS, STATE_NAMES):
            meas = res["state"][key]
            rows.append([res["rank"], f"({res['tp_rank']}, {res['stage']}, {res['dp_rank']})", name, comp[key], meas,
                         "yes" if comp[key] == meas else "NO"])
    out = ["Measured model state per rank, bytes (one step, gloo on the CPU)", "",
           table(["rank", "(tp, pp, dp)", "quantity", "computed", "measured", "equal"], rows, md), ""]
    group, rows = first_tp_group(results), []
    lengths = (setup.config.model.seq_length, setup.kept_length)
    for rec in RECOMPUTE:
        for kind, n, meas in zip(("dense", "LTD"), lengths, measured_parts(setup, group, rec)):
            if meas is not None:
                comp, meas = layer_bytes(setup, n, rec), sum(meas.values())
                rows.append([rec, kind, n, comp, f"{meas:.0f}", f"{meas / comp:.4f}"])
    why = activation_unmodelled(setup.config)
    if why is not None:
        rows = [[*row[:3], "—", row[4], "—"] for row in rows]
    ranks = "rank 0" if len(group) == 1 else f"ranks {', '.join(str(res['rank']) for res in group)} (mean)"
    out += [f"Measured activations of {ranks}, bytes per layer and micro-batch (computed: {setup.device} formula"
            f"{'' if why is None else '; not modelled: ' + why}); embedding + head + loss measured: "
            + ", ".join(f"{rec} {group[0]['outside'][rec]}" for rec in RECOMPUTE), "",
            table(["recompute", "layers (mean)", "tokens", "computed", "measured", "measured / computed"], rows, md)]
    if why is None:
        out += ["", parts_report(setup, results, baseline, md)]
    return "\n".join(out)


def parts_report(setup: Setup, results: List[dict], baseline: Optional[List[dict]], md: bool) -> str:
    """Recompute none, part by part; with `baseline` (the same run without sequence parallelism, measured)
    also the measured ratio SP / no SP."""
    group, lengths = first_tp_group(results), (setup.config.model.seq_length, setup.kept_length)
    measured = measured_parts(setup, group, "none")
    if baseline is not None:
        off = with_sequence_parallel(setup, False)
        measured_off = measured_parts(off, first_tp_group(baseline), "none")
    rows = []
    for i, (kind, n) in enumerate(zip(("dense", "LTD"), lengths)):
        if measured[i] is None:
            continue
        comp = layer_parts(setup, n, "none")
        if baseline is not None:
            comp_off = layer_parts(off, n, "none")
        for name, key in [*zip(PART_NAMES, PARTS), ("layer", None)]:
            c, m = (comp[key], measured[i][key]) if key else (sum(comp.values()), sum(measured[i].values()))
            if key == "routing" and kind == "dense" and c == m == 0:
                continue
            row = [kind, name, c, f"{m:.0f}"]
            if baseline is not None:
                c0, m0 = (comp_off[key], measured_off[i][key]) if key else \
                    (sum(comp_off.values()), sum(measured_off[i].values()))
                row += [c0, f"{m0:.0f}", ratio(m, m0)]
            rows.append(row)
    headers = ["layers (mean)", "part", "computed", "measured"]
    head = "Measured activations by part, recompute none, bytes per layer and micro-batch"
    if baseline is not None:
        headers += ["computed, no SP", "measured, no SP", "SP / no SP, measured"]
        head += (f"; the same run without --sequence-parallel also measured (tp {setup.tp}: 1/tp = "
                 f"{1 / setup.tp:.4f})")
        per_rank = [sum(res["layers"]["none"].get(str(x), {}).get("routing", 0) for x in setup.ltd_layers)
                    for res in group]
        if any(per_rank):
            head += f". LTD routing bytes of each TP rank, all LTD layers: {per_rank} (their mean is computed)"
    return head + "\n\n" + table(headers, rows, md)


def main(argv=None) -> int:
    setup, opts = resolve(sys.argv[1:] if argv is None else argv)
    if opts.measure:
        check_measurable(setup)  # before any output
    print(describe(setup) + "\n")
    print(state_report(setup, opts.all_modes, opts.markdown) + "\n")
    print(activation_report(setup, opts.markdown))
    if opts.measure:
        baseline = measure(with_sequence_parallel(setup, False)) if setup.sp else None
        print("\n" + measure_report(setup, measure(setup), opts.markdown, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
