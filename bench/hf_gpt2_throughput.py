"""Dense training throughput of our GPTModel against Hugging Face transformers' GPT2LMHeadModel.

Why: a user weighing this framework against the obvious alternative (HF's GPT-2 plus a plain PyTorch
loop) should see that our dense baseline is not slow to begin with, before any token dropping.

Both models have the same shape and numerics: pre-LayerNorm GPT-2 blocks, learned absolute positions,
exact GELU (HF's `activation_function="gelu"`), biases, tied input/output embeddings, dropout 0, attention
through `scaled_dot_product_attention` (HF's `attn_implementation="sdpa"`), the same init seed. A step is
what each side's training loop does:

    ours: GPTModel(tokens, labels) -> per-token loss -> mean -> backward -> our Optimizer.step() (AdamW with
          Megatron's param groups and global-norm clipping) -> zero_grad
    HF:   GPT2LMHeadModel(tokens, labels=tokens) -> loss (HF shifts the labels inside) -> backward ->
          clip_grad_norm_ -> torch.optim.AdamW.step() -> zero_grad

The two steps alternate in one process (a round is one step of each, in alternating order), after
--warmup rounds; tokens/s = b*s / median step time. bf16 means each side's own way: ours bf16 parameters
with fp32 main parameters and an fp32 gradient buffer (the trainer's `--bf16`), HF torch.autocast over
forward and loss with fp32 weights (what `transformers.Trainer(bf16=True)` does). On CPU the script re-executes itself with glibc's malloc thresholds pinned
(bench/ltd_step_time.py explains why); both models run in that same process, so neither gains.

    python bench/hf_gpt2_throughput.py                             # L 4 / h 256 / s 256 / b 8, fp32 and bf16
    python bench/hf_gpt2_throughput.py --layers 8 --dtypes bf16 --rounds 10 --markdown out.md
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ltd_step_time import Clock, keep_freed_memory, machine  # noqa: E402

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.distributed import DataParallelGradSync  # noqa: E402
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig  # noqa: E402
from megatron.core.transformer.config import TransformerConfig  # noqa: E402

SEED = 1234


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of each model per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--glibc-malloc-defaults", action="store_true")
    p.add_argument("--markdown", help="also write the table, command and machine to this file")
    return p.parse_args(argv)


def build_ours(args, device, dtype):
    torch.manual_seed(SEED)
    cfg = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                            seq_length=args.seq, vocab_size=args.vocab, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg).to(device, torch.bfloat16 if dtype == "bf16" else torch.float32).train()
    sync = DataParallelGradSync(model.parameters(), grad_dtype=torch.float32)  # one process: no collectives
    opt = Optimizer(model, OptimizerConfig(lr=1e-4, weight_decay=0.01, clip_grad=1.0), sync)
    position_ids = torch.arange(args.seq, device=device).expand(args.batch, args.seq)

    def step(tokens, labels):
        loss = model(tokens, position_ids, labels).mean()  # [b, s] per-token loss -> scalar
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return model, step


def build_hf(args, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                     n_head=args.heads, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4)

    def step(tokens, labels):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def measure(args, dtype, device, clock):
    ours_model, ours = build_ours(args, device, dtype)
    hf_model, hf = build_hf(args, device)
    n_ours = sum(p.numel() for p in ours_model.parameters())
    n_hf = sum(p.numel() for p in hf_model.parameters())
    g = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    tokens, labels = data[:, :-1], data[:, 1:]
    hf_autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())
    times = {"ours": [], "hf": []}
    steps = {"ours": ours, "hf": hf}
    for rnd in range(args.warmup + args.rounds):
        order = ["ours", "hf"] if rnd % 2 == 0 else ["hf", "ours"]
        for name in order:
            t0 = clock()
            with hf_autocast if name == "hf" else contextlib.nullcontext():
                loss = steps[name](tokens, labels)
            loss.item()
            if rnd >= args.warmup:
                times[name].append(clock() - t0)
    tok = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"dtype": dtype, "params_ours": n_ours, "params_hf": n_hf, "ours_ms": med["ours"] * 1e3,
            "hf_ms": med["hf"] * 1e3, "ours_tps": tok / med["ours"], "hf_tps": tok / med["hf"],
            "ratio": med["hf"] / med["ours"]}


HEADER = ("| L | h | s | b | V | dtype | params ours / HF | ours ms/step | HF ms/step | ours tokens/s | HF tokens/s "
          "| ours / HF throughput |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(args, r):
    return (f"| {args.layers} | {args.hidden} | {args.seq} | {args.batch} | {args.vocab} | {r['dtype']} | "
            f"{r['params_ours'] / 1e6:.2f}M / {r['params_hf'] / 1e6:.2f}M | {r['ours_ms']:.1f} | {r['hf_ms']:.1f} | "
            f"{r['ours_tps']:.0f} | {r['hf_tps']:.0f} | **{r['ratio']:.3f}** |")


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    import transformers

    clock = Clock(device)
    t0 = time.time()
    lines = [HEADER]
    print(HEADER, flush=True)
    for dtype in args.dtypes.split(","):
        line = row(args, measure(args, dtype, device, clock))
        lines.append(line)
        print(line, flush=True)
    footer = (f"\nMachine: {machine(device)}; transformers {transformers.__version__}. Medians of {args.rounds} "
              f"alternating rounds after {args.warmup} warm-up rounds. Wall time {time.time() - t0:.0f} s.\n"
              f"Command: python bench/hf_gpt2_throughput.py {' '.join(sys.argv[1:])}")
    print(footer)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
