"""One host read per training iteration: the loss, the gradient norm, the inf/NaN verdict and the stop flags
come back together (docs/training.md), whatever the precision, also on an fp16 step skipped for overflow.
Counted on the CPU by wrapping every Tensor method that hands a value to Python; on CUDA each is a sync."""

import collections

import pytest
import torch

from megatron.training import trainer as trainer_module
from tests.functional.gpt_cli import TINY, run_inprocess

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "10"]


@pytest.mark.parametrize("precision", [[], ["--fp16", "--initial-loss-scale", "4294967296"]],
                         ids=["fp32", "fp16-with-an-overflow"])
def test_one_host_read_per_iteration(monkeypatch, precision, tmp_path):
    reads, inside = collections.Counter(), [False]
    for name in HOST_READS:
        def counted(self, *args, _method=getattr(torch.Tensor, name), _name=name, **kwargs):
            if inside[0]:
                reads[_name] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train_step = trainer_module.Trainer.train_step
    results = []

    def step(self, *args, **kwargs):
        inside[0] = True
        try:
            out = train_step(self, *args, **kwargs)
        finally:
            inside[0] = False
        results.append(out[1])
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    assert run_inprocess(TINY + LTD + precision + ["--train-iters", "3", "--eval-iters", "0",
                                                  "--log-json", str(tmp_path / "m.jsonl")]) == 0
    assert reads == {"tolist": 3}, reads  # one per iteration
    if "--fp16" in precision:
        assert results[0].skipped, "2**32 overflows the first step: the skip was decided on the device"
