"""Shared pieces of the reliability tests: tiny runs in-process, and faults injected into them.

Faults are injected by wrapping the entry point's `forward_step` (what `pretrain` calls), so everything
after it (the schedule, the optimizer, the checks, the checkpoints) is the code a real run executes.
"""

import math
import os

import torch

from tests.functional.gpt_cli import TINY as GPT_TINY
from tests.functional.gpt_cli import load_entry, read_json_lines, run_inprocess, train_records  # noqa: F401

# These tests damage and inspect Megatron's legacy files by name (model_optim_rng.pt), so their runs save
# in that format; the torch_dist format's own faults (truncated shards, kills during asynchronous saves)
# are in test_crash_safe_saves.py and tests/functional/test_torch_dist_checkpoint.py.
TINY = GPT_TINY + ["--ckpt-format", "torch"]
NO_EVAL = ["--eval-iters", "0"]


def tree(root) -> list:
    """Every file under `root`, relative, sorted."""
    out = []
    for base, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(base, f), root) for f in files]
    return sorted(out)


class Faults:
    """Replaces forward_step: on the listed training micro-batches (1-based, counted in this run) the
    gradient of the per-token loss becomes `grad` (inf/nan: the loss stays finite), or the loss
    itself is multiplied by `loss` (a forward fault)."""

    def __init__(self, micro_batches, grad=None, loss=None):
        self.at, self.grad, self.loss = set(micro_batches), grad, loss
        self.count = 0
        self.real = load_entry().forward_step

    def __call__(self, data_iterator, model):
        output, loss_fn = self.real(data_iterator, model)
        if not model.training:
            return output, loss_fn
        self.count += 1
        if self.count not in self.at:
            return output, loss_fn
        if self.grad is not None:
            output.register_hook(lambda g: torch.full_like(g, self.grad))
            return output, loss_fn

        def bad_loss_fn(out):
            loss, _ = loss_fn(out)
            loss = loss * self.loss
            return loss, {"lm loss": loss.detach()}

        return output, bad_loss_fn


def run_with(monkeypatch, argv, faults=None) -> int:
    """run_inprocess with `faults` standing in for the entry point's forward_step."""
    entry = load_entry()
    with monkeypatch.context() as m:
        if faults is not None:
            m.setattr(entry, "forward_step", faults)
        return run_inprocess(argv)


def finite_model(path) -> bool:
    model = torch.load(path, weights_only=True)["model"]
    return all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)
