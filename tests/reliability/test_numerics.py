"""Numerical faults: fp16 overflow is skipped (scale halved, counted, LR held); an inf/NaN that loss
scaling cannot absorb stops the run with one line naming the iteration, before anything is saved."""

import pytest
import torch

from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from tests.reliability.common import NO_EVAL, TINY, Faults, finite_model, is_nan, run_with, train_records, tree

FP16 = TINY + NO_EVAL + ["--fp16", "--initial-loss-scale", "1024", "--hysteresis", "1", "--train-iters", "8"]


def test_fp16_inf_gradient_is_skipped_and_the_lr_schedule_waits(tmp_path, monkeypatch):
    """Iteration 3 gets an inf gradient: skipped, scale 1024 -> 512, counted; the LR schedule does not
    advance on it (Megatron), the data does; resuming after the skip is exact."""
    logs = {k: str(tmp_path / f"{k}.jsonl") for k in ("clean", "fault", "resumed")}
    assert run_with(monkeypatch, FP16 + ["--log-json", logs["clean"]]) == 0
    assert run_with(monkeypatch, FP16 + ["--log-json", logs["fault"]], Faults([5], grad=float("inf"))) == 0
    clean, fault = train_records(logs["clean"]), train_records(logs["fault"])
    assert [r["iteration"] for r in fault] == list(range(1, 9))  # the run went on
    assert [r["skipped_iterations"] for r in fault] == [0, 0] + [1] * 6
    assert [r["loss_scale"] for r in fault] == [1024.0] * 2 + [512.0] * 6
    assert is_nan(fault[2]["grad_norm"]) and fault[2]["lm_loss"] == clean[2]["lm_loss"]  # the loss was finite
    assert [r["consumed_samples"] for r in fault] == [r["consumed_samples"] for r in clean]
    assert fault[3]["lr"] == fault[2]["lr"]  # progress did not advance on the skipped step
    assert [r["lr"] for r in fault[3:]] == [r["lr"] for r in clean[2:-1]]  # the schedule runs one step late

    save = ["--save", str(tmp_path / "ck"), "--save-interval", "4", "--log-json", logs["resumed"]]
    assert run_with(monkeypatch, FP16 + save + ["--exit-interval", "4"], Faults([5], grad=float("inf"))) == 0
    assert run_with(monkeypatch, FP16 + save + ["--load", str(tmp_path / "ck")]) == 0
    resumed = train_records(logs["resumed"])
    for key in ("lr", "lm_loss", "loss_scale", "skipped_iterations"):
        assert [r[key] for r in resumed] == [r[key] for r in fault], key


@pytest.mark.parametrize("precision, faults, needle", [
    ("--bf16", dict(grad=float("nan")), "iteration 3: the gradient norm is nan (bf16); the update was not applied"),
    ("--fp32", dict(grad=float("inf")), "(fp32); the update was not applied"),
    ("--fp16", dict(loss=float("nan")), "iteration 3: the loss is not finite (lm loss nan, fp16)"),
], ids=["bf16-nan-grad", "fp32-inf-grad", "fp16-nan-loss"])
def test_fault_without_remedy_stops_before_saving(tmp_path, monkeypatch, capsys, precision, faults, needle):
    """bf16/fp32 have no loss scale to retry with, and in fp16 a NaN loss (forward overflow) is beyond
    what the scale fixes: stop with one line naming the iteration; the checkpoint of iteration 2 stays
    the last, and it is finite."""
    ck = tmp_path / "ck"
    argv = TINY + NO_EVAL + ["--train-iters", "6", "--save", str(ck), "--save-interval", "2",
                             "--log-json", str(tmp_path / "m.jsonl")] + ([precision] if precision != "--fp32" else [])
    assert run_with(monkeypatch, argv, Faults([6], **faults)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: iteration 3: ") and needle in err[0], err
    assert f"nothing was saved and the last checkpoint is iteration 2 in {ck}" in err[0]
    assert tree(ck) == ["iter_0000002/mp_rank_00/model_optim_rng.pt", "latest_checkpointed_iteration.txt"]
    assert finite_model(ck / "iter_0000002/mp_rank_00/model_optim_rng.pt")
    assert [r["iteration"] for r in train_records(tmp_path / "m.jsonl")] == [1, 2, 3]  # the faulty one logged


def test_check_can_be_turned_off(tmp_path, monkeypatch):
    """--no-check-for-nan-in-loss-and-grad: Megatron's old behaviour, the run goes on and counts."""
    argv = TINY + NO_EVAL + ["--bf16", "--train-iters", "4", "--no-check-for-nan-in-loss-and-grad",
                             "--log-json", str(tmp_path / "m.jsonl")]
    assert run_with(monkeypatch, argv, Faults([5], grad=float("nan"))) == 0
    recs = train_records(tmp_path / "m.jsonl")
    assert len(recs) == 4 and recs[-1]["nan_iterations"] >= 1  # the NaN reached the weights, as it would


def test_optimizer_leaves_weights_untouched_on_a_nonfinite_step():
    torch.manual_seed(0)
    for config in (OptimizerConfig(lr=0.1, fp16=True, initial_loss_scale=8.0, hysteresis=1),
                   OptimizerConfig(lr=0.1, check_for_nan=True)):
        model = torch.nn.Linear(4, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = Optimizer(model, config)
        model(torch.ones(2, 4)).sum().backward()
        model.weight.grad[0, 0] = float("inf")
        result = opt.step()
        assert result.skipped and result.nonfinite == (not config.fp16)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert opt.loss_scale == (4.0 if config.fp16 else 1.0)
