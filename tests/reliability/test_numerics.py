"""Numerical faults: fp16 overflow is skipped (scale halved, counted, LR held); an inf/NaN that loss
scaling cannot absorb stops the run with one line naming the iteration, before anything is saved."""

import contextlib
import io

import pytest
import torch

from megatron.core.distributed import DataParallelGradSync
from megatron.core.optimizer.grad_scaler import DynamicGradScaler
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from tests.distributed.launcher import GLOO, run_distributed
from tests.reliability.common import (NO_EVAL, TINY, Faults, finite_model, is_nan, load_entry, run_inprocess,
                                      run_with, train_records, tree)

FP16 = TINY + NO_EVAL + ["--fp16", "--initial-loss-scale", "1024", "--hysteresis", "1", "--train-iters", "8"]


def test_fp16_inf_gradient_is_skipped_and_the_lr_schedule_waits(tmp_path, monkeypatch):
    """Iteration 3 gets an inf gradient: skipped, scale 1024 -> 512, counted; the LR schedule does not
    advance on it (Megatron), the data does; resuming after the skip is exact."""
    logs = {k: str(tmp_path / f"{k}.jsonl") for k in ("clean", "fault", "resumed")}
    assert run_with(monkeypatch, FP16 + ["--log-json", logs["clean"]]) == 0
    assert run_with(monkeypatch, FP16 + ["--log-json", logs["fault"]], Faults([5], grad=float("inf"))) == 0
    clean, fault = train_records(logs["clean"]), train_records(logs["fault"])
    assert [r["iteration"] for r in fault] == list(range(1, 9))  # the run went on
    assert [r["skipped_iterations"] for r in fault] == [0, 0, 1, 0, 0, 0, 0, 0]  # per log interval (Megatron)
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
    """--no-check-for-nan-in-loss-and-grad: Megatron's old behaviour, the run goes on and counts. The NaN
    gradient of iteration 2 reaches the weights, so iterations 3-6 have a NaN loss; the log line counts
    them per log interval (2 iterations), as Megatron does, not cumulatively."""
    argv = TINY + NO_EVAL + ["--bf16", "--train-iters", "6", "--log-interval", "2",
                             "--no-check-for-nan-in-loss-and-grad", "--log-json", str(tmp_path / "m.jsonl")]
    assert run_with(monkeypatch, argv, Faults([3], grad=float("nan"))) == 0
    recs = train_records(tmp_path / "m.jsonl")
    assert [r["iteration"] for r in recs] == [2, 4, 6]
    assert [r["nan_iterations"] for r in recs] == [0, 2, 2] and is_nan(recs[-1]["lm_loss"])


def test_optimizer_leaves_weights_untouched_on_a_nonfinite_step():
    torch.manual_seed(0)
    for config in (OptimizerConfig(lr=0.1, fp16=True, initial_loss_scale=8.0, hysteresis=1),
                   OptimizerConfig(lr=0.1, check_for_nan=True)):
        model = torch.nn.Linear(4, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = Optimizer(model, config, DataParallelGradSync(model.parameters()))
        model(torch.ones(2, 4)).sum().backward()
        model.weight.main_grad[0, 0] = float("inf")
        result = opt.step()
        assert result.skipped and result.nonfinite == (not config.fp16)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert opt.loss_scale == (4.0 if config.fp16 else 1.0)


def test_dynamic_loss_scale_follows_megatrons_hysteresis_rule():
    """Megatron's DynamicGradScaler, step by step against a hand-written table: the hysteresis counter
    counts overflows down and is reset only when the scale grows, never by clean steps."""
    scaler = DynamicGradScaler(initial_scale=8.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    table = [  # (overflow?, scale, growth tracker, hysteresis tracker) after the step
        (True, 8.0, 0, 1),    # the first overflow keeps the scale
        (True, 4.0, 0, 0),    # the second halves it
        (False, 4.0, 1, 0),
        (False, 4.0, 2, 0),
        (True, 2.0, 0, -1),   # clean steps did not restore the counter: this overflow halves at once
        (False, 2.0, 1, -1),
        (False, 2.0, 2, -1),
        (False, 4.0, 0, 2),   # 3 clean steps in a row: x2, and the hysteresis counter is reset
        (True, 4.0, 0, 1),    # so the next overflow is tolerated again
        (True, 2.0, 0, 0),
        (True, 1.0, 0, -1),
        (True, 1.0, 0, -2),   # floor at --min-loss-scale
    ]
    for overflow, *want in table:
        scaler.update(overflow)
        assert [scaler.scale, scaler.growth_tracker, scaler.hysteresis_tracker] == want, (overflow, want)


@pytest.mark.parametrize("flags, needle", [
    (["--hysteresis", "0"], "--hysteresis must be >= 1, got 0"),
    (["--loss-scale-window", "0"], "--loss-scale-window must be >= 1, got 0"),
    (["--min-loss-scale", "0"], "--min-loss-scale must be positive, got 0"),
    (["--initial-loss-scale", "0.5"], "--initial-loss-scale 0.5 is below --min-loss-scale 1"),
    (["--loss-scale", "0"], "--loss-scale must be positive, got 0"),
], ids=["hysteresis", "window", "min-scale", "initial-below-min", "constant-scale"])
def test_bad_loss_scale_flags_are_one_line(tmp_path, capsys, flags, needle):
    argv = TINY + NO_EVAL + ["--fp16", "--train-iters", "3", "--log-json", str(tmp_path / "m.jsonl")] + flags
    assert run_inprocess(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "arguments" not in captured.out and not (tmp_path / "m.jsonl").exists()  # refused before any work


def _fault_on_one_rank(rank, world, argv, faulty_rank, fault, out):
    """Only `faulty_rank` gets the fault (in iteration 3); each rank records its exit code and stderr."""
    entry = load_entry()
    if rank == faulty_rank:
        entry.forward_step = Faults([5], **fault)  # 2 micro-batches per iteration: the first of iteration 3
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_inprocess(argv)
    (out / f"rank{rank}.txt").write_text(f"{code}\n{err.getvalue()}")


NAN_LOSS, INF_GRAD = dict(loss=float("nan")), dict(grad=float("inf"))


@pytest.mark.parametrize("layout, precision, faulty_rank, fault, line", [
    ("--pipeline-model-parallel-size", "--bf16", 1, NAN_LOSS,
     "error: iteration 3: the gradient norm is nan (bf16); the update was not applied; nothing was saved"),
    ("--tensor-model-parallel-size", "--fp16", 1, NAN_LOSS,
     "error: iteration 3: the loss is not finite (lm loss nan, fp16); nothing was saved"),
    ("--pipeline-model-parallel-size", "--fp16", 0, INF_GRAD, None),
    ("--tensor-model-parallel-size", "--fp16", 1, INF_GRAD, None),
], ids=["pp-nan-loss-bf16", "tp-nan-loss-fp16", "pp-inf-grad-on-first-stage", "tp-inf-grad-on-rank-1"])
def test_ranks_agree_on_numerical_faults(tmp_path, layout, precision, faulty_rank, fault, line):
    """Two gloo ranks, the fault on one of them. A NaN loss stops both ranks with the same line (also the
    rank whose own loss is finite, and the first pipeline stage, which has no loss); an fp16 inf gradient
    on one rank is skipped by both: each rank's loss scale is halved, each counts one skipped iteration."""
    ck = tmp_path / "ck"
    argv = TINY + NO_EVAL + GLOO + [layout, "2", precision, "--initial-loss-scale", "1024", "--hysteresis", "1",
                             "--train-iters", "4", "--save", str(ck), "--log-json", str(tmp_path / "m.jsonl")]
    run_distributed(_fault_on_one_rank, world_size=2, args=(argv, faulty_rank, fault, tmp_path), hang_after_s=300)
    results = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in range(2)]
    if line is not None:
        codes, errs = [int(c) for c, _ in results], [e.strip().splitlines() for _, e in results]
        assert codes == [2, 2] and len(errs[0]) == 1 and errs[0] == errs[1], errs
        assert errs[0][0].startswith(line) and not ck.exists()
        return
    assert [int(c) for c, _ in results] == [0, 0], results
    records = train_records(tmp_path / "m.jsonl")
    assert [r["skipped_iterations"] for r in records] == [0, 0, 1, 0]
    assert [r["loss_scale"] for r in records] == [1024.0, 1024.0, 512.0, 512.0]
    files = sorted((ck / "iter_0000004").glob("*/model_optim_rng.pt"))
    assert len(files) == 2
    for f in files:
        saved = torch.load(f, weights_only=True)
        assert saved["optimizer"]["grad_scaler"]["scale"] == 512.0 and saved["train_state"]["skipped_iterations"] == 1
        assert finite_model(f)
