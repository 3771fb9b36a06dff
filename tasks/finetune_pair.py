#!/usr/bin/env python
"""Fine-tune a pretrained BERT on a sentence-pair task (MNLI, QQP) and report validation accuracy.

    python tasks/finetune_pair.py --task MNLI --pretrained-checkpoint runs/bert/checkpoints \
        --train-data MNLI/train.tsv --valid-data MNLI/dev_matched.tsv MNLI/dev_mismatched.tsv \
        --epochs 3 --micro-batch-size 32 --lr 2e-5 --seq-length 128

How Megatron-LM judges a BERT checkpoint: the pretrained encoder and pooler, dropout, then a fresh linear
layer to the task's classes on the pooled [CLS]; cross entropy; AdamW with linear warmup
(`--lr-warmup-fraction`) and linear decay over all epochs; accuracy on every `--valid-data` file after
each epoch (and every `--eval-interval` iterations). The model shape and the tokenizer come from the
checkpoint's saved flags (override moved tokenizer files with `--vocab-file`). One process, on the GPU
when there is one; `--global-batch-size` accumulates micro-batches.

Prints one line per `--log-interval` iterations and `validation accuracy on <file>: ...`; `--log-json`
appends the same as JSON objects. The last accuracies are also the process's result (`main` returns 0).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from megatron.checkpoint.tokenizer import tokenizer_from_args  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DataParallelGradSync  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.core.models.bert import BertModel  # noqa: E402
from megatron.core.models.init import full_init  # noqa: E402
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig  # noqa: E402
from megatron.core.transformer.config import TransformerConfig  # noqa: E402
from megatron.training.cli import ArgumentParser  # noqa: E402  (flag mistakes become one-line UserErrors)
from megatron.training.cli import run_cli  # noqa: E402
from megatron.training.lr_schedule import LRScheduleConfig, lr_at  # noqa: E402
from tasks.checkpoint import bert_config, load_pretrained_bert  # noqa: E402
from tasks.glue import TASKS, PairDataset, read_pairs  # noqa: E402

# Pretrained parameters a classifier may lack in its checkpoint (MLM-only pretraining has no pooler or
# token types); they start from the usual init instead.
OPTIONAL = ("pooler.", "embedding.tokentype_embeddings.")


class PairClassifier(nn.Module):
    """BERT encoder + pooler, dropout, linear to `num_classes` on the pooled first token."""

    def __init__(self, config: TransformerConfig, num_classes: int, seed: int = 1234):
        super().__init__()
        self.bert = BertModel(config, seed=seed, add_binary_head=False, add_lm_head=False, add_pooler=True,
                              num_tokentypes=2)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classification_head = nn.Linear(config.hidden_size, num_classes)
        with torch.no_grad():
            w = self.classification_head.weight
            w.copy_(full_init("classification_head.weight", tuple(w.shape), config.init_method_std, 1, seed))
            self.classification_head.bias.zero_()

    def forward(self, tokens, token_types, padding_mask):  # each [b, s]
        pooled = self.bert.pooler(self.bert.encode(tokens, token_types, padding_mask))  # [b, h]
        return self.classification_head(self.dropout(pooled))  # [b, classes]

    def load_pretrained(self, state: dict) -> list:
        """Copy the pretrained encoder (and pooler, token types when present); the MLM and SOP heads are
        not used. Returns the names that kept their fresh init."""
        own = self.bert.state_dict()
        take = {k: v for k, v in state.items() if k in own}
        fresh = sorted(set(own) - set(take))
        required = [k for k in fresh if not k.startswith(OPTIONAL)]
        if required:
            raise UserError(f"the pretrained checkpoint lacks {required[:3]}; it is not a BERT encoder of this shape")
        self.bert.load_state_dict(take, strict=False)
        return fresh


@torch.no_grad()
def accuracy(model: PairClassifier, data: PairDataset, batch_size: int, device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in data.batch(np.arange(start, min(start + batch_size, len(data)))).items()}
        logits = model(b["text"], b["types"], b["padding_mask"])  # [b, classes]
        correct += int((logits.argmax(-1) == b["label"]).sum())
    model.train()
    return correct / len(data)


def finetune(model: PairClassifier, train: PairDataset, valid: dict, args, device, log=print) -> dict:
    """Train for `args.epochs` epochs; {valid name: accuracy} after the last one."""
    mbs, gbs = args.micro_batch_size, args.global_batch_size or args.micro_batch_size
    accumulation = gbs // mbs
    steps_per_epoch = len(train) // gbs
    if steps_per_epoch < 1:
        raise UserError(f"--global-batch-size {gbs} is larger than the {len(train)} training pairs")
    total = steps_per_epoch * args.epochs
    lr_cfg = LRScheduleConfig(args.lr, args.min_lr, "linear" if total > 1 else "constant",
                              warmup_samples=args.lr_warmup_fraction * total * gbs, decay_samples=total * gbs)
    if args.bf16:  # bf16 weights, fp32 main parameters and gradient buffer, as in pretraining
        model.to(torch.bfloat16)
    sync = DataParallelGradSync(model.parameters(), grad_dtype=torch.float32)
    optimizer = Optimizer(model, OptimizerConfig(lr=args.lr, weight_decay=args.weight_decay,
                                                 clip_grad=args.clip_grad), sync)

    rng = np.random.RandomState(args.seed)
    results, it, t0, interval = {}, 0, time.perf_counter(), []

    def evaluate(epoch):
        for name, data in valid.items():
            acc = accuracy(model, data, args.eval_batch_size or mbs, device)
            results[name] = acc
            log(f" validation accuracy on {name} after iteration {it} (epoch {epoch:g}): {100 * acc:.2f}% "
                f"of {len(data)}", {"iteration": it, "epoch": epoch, "valid": name, "accuracy": acc})

    model.train()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train))[:steps_per_epoch * gbs].reshape(steps_per_epoch, accumulation, mbs)
        for step in order:
            lr = lr_at(lr_cfg, it * gbs)
            optimizer.set_lr(lr)
            optimizer.zero_grad()
            for micro in step:
                b = {k: v.to(device) for k, v in train.batch(micro).items()}
                logits = model(b["text"], b["types"], b["padding_mask"])  # [b, classes]
                loss = F.cross_entropy(logits.float(), b["label"])
                (loss / accumulation).backward()
                interval.append(loss.item())
            result = optimizer.step()
            it += 1
            if it % args.log_interval == 0:
                ms = 1000 * (time.perf_counter() - t0) / args.log_interval
                log(f" iteration {it:8d}/{total:8d} | epoch {epoch + 1} | learning rate: {lr:.6E} | "
                    f"loss: {np.mean(interval):.6E} | grad norm: {result.grad_norm:.3f} | "
                    f"elapsed time per iteration (ms): {ms:.1f} |",
                    {"iteration": it, "epoch": epoch + it / total, "lr": lr, "loss": float(np.mean(interval)),
                     "grad_norm": result.grad_norm})
                interval, t0 = [], time.perf_counter()
            if args.eval_interval and it % args.eval_interval == 0 and it % steps_per_epoch:
                evaluate(epoch + (it % steps_per_epoch) / steps_per_epoch)
        evaluate(epoch + 1)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Fine-tune a pretrained BERT on sentence pairs (MNLI, QQP) and report accuracy",
                allow_abbrev=False)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--pretrained-checkpoint", required=True, help="the --save folder of pretrain_bert_ltd.py")
    p.add_argument("--train-data", required=True, help="labelled TSV in the GLUE layout of --task")
    p.add_argument("--valid-data", nargs="+", required=True, help="one or more labelled TSV files")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the micro batch (no accumulation)")
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--lr-warmup-fraction", type=float, default=0.065)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--hidden-dropout", type=float, default=0.1)
    p.add_argument("--attention-dropout", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--eval-interval", type=int, default=None, help="also evaluate every N iterations")
    p.add_argument("--log-json", default=None, help="append one JSON object per log line")
    p.add_argument("--vocab-file", default=None, help="the tokenizer's vocab.txt, if it moved since pretraining")
    return p


def validate(args) -> None:
    if args.epochs < 1 or args.micro_batch_size < 1 or args.log_interval < 1:
        raise UserError("--epochs, --micro-batch-size and --log-interval must be positive")
    gbs = args.global_batch_size or args.micro_batch_size
    if gbs % args.micro_batch_size:
        raise UserError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {args.micro_batch_size}")
    if not 0.0 <= args.lr_warmup_fraction < 1.0:
        raise UserError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("fine-tuning runs in one process; launch it with python, not torchrun")


def valid_names(paths: list) -> list:
    """The name each --valid-data file is reported under: its file name, or the path as given where two
    files share a name (a/dev.tsv and b/dev.tsv must not overwrite each other's accuracy)."""
    real = [os.path.realpath(p) for p in paths]
    twice = next((p for p, r in zip(paths, real) if real.count(r) > 1), None)
    if twice is not None:
        raise UserError(f"--valid-data names {twice} twice; give each file once")
    base = [os.path.basename(p) for p in paths]
    return [b if base.count(b) == 1 else p for b, p in zip(base, paths)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    names = valid_names(args.valid_data)  # before any work: a file named twice is a user error
    bert = load_pretrained_bert(args.pretrained_checkpoint)
    tokenizer = tokenizer_from_args(bert.args, bert.root, {"vocab_file": args.vocab_file})
    config = bert_config(bert.args, args.hidden_dropout, args.attention_dropout)
    seq = args.seq_length or config.seq_length
    if seq > config.max_position_embeddings:
        raise UserError(f"--seq-length {seq} exceeds the checkpoint's position table "
                        f"({config.max_position_embeddings})")
    torch.manual_seed(args.seed)
    model = PairClassifier(config, len(TASKS[args.task].labels), seed=args.seed)
    fresh = model.load_pretrained(bert.state)
    device = parallel_state.device_for_backend(None)
    model.to(device)
    json_file = open(args.log_json, "a") if args.log_json else None

    def log(line, record=None):
        print(line, flush=True)
        if json_file and record is not None:
            json_file.write(json.dumps({"task": args.task, **record}) + "\n")
            json_file.flush()

    def load(path):
        pairs, skipped = read_pairs(path, args.task)
        if skipped:
            print(f" WARNING: skipped {skipped} malformed rows of {path}", flush=True)
        return PairDataset(pairs, tokenizer, seq)

    train = load(args.train_data)
    valid = {name: load(p) for name, p in zip(names, args.valid_data)}
    print(f" fine-tuning {args.task} from {bert.root} iteration {bert.iteration} "
          f"on {device}: {len(train)} training pairs, {args.epochs} epochs; fresh: classification head"
          + "".join(f", {n}" for n in fresh), flush=True)
    try:
        results = finetune(model, train, valid, args, device, log)
    finally:
        if json_file:
            json_file.close()
    summary = ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in results.items())
    print(f" final accuracy ({args.task}): {summary}", flush=True)
    return 0 if all(math.isfinite(a) for a in results.values()) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
