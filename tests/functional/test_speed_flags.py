"""The speed flags of pretrain_gpt_ltd.py end to end on a tiny CPU run: --torch-compile, --log-throughput
(TFLOP/s and MFU in the log line and JSON), --timing-log-level, --profile; and their bad values."""

import glob
import json

import pytest

from megatron.training.arguments import parse_args
from megatron.training.config import resolve_config
from megatron.training.flops import iteration_flops
from tests.functional.gpt_cli import TINY, assert_one_error_line, run_inprocess, run_subprocess, train_records

LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "8"]


def test_compiled_ltd_run_logs_throughput_mfu_timers_and_writes_a_trace(tmp_path, capsys):
    log, tb = tmp_path / "m.jsonl", tmp_path / "tb"
    argv = TINY + LTD + ["--train-iters", "4", "--log-interval", "2", "--eval-iters", "1", "--eval-interval", "4",
                         "--log-json", str(log),
                         "--torch-compile", "--log-throughput", "--peak-tflops", "0.001", "--timing-log-level", "2",
                         "--profile", "--profile-step-start", "1", "--profile-step-end", "3",
                         "--tensorboard-dir", str(tb)]
    assert run_inprocess(argv) == 0
    out = capsys.readouterr().out
    compiles = [ln for ln in out.splitlines() if ln.startswith(" torch.compile: ")]
    # iteration 1 compiles the layers; iterations 2-4 run new kept lengths without recompiling; evaluation
    # (full sequence, no autograd) compiles its own graph once, reported after the first evaluation
    assert [ln.split(" during ")[1] for ln in compiles] == ["iteration 1", "evaluation"], compiles
    assert all(" graphs compiled in " in ln for ln in compiles)
    line = next(ln for ln in out.splitlines() if "iteration        4/" in ln)
    for field in ("| throughput per GPU (TFLOP/s/GPU): ", "| dense-equivalent throughput per GPU (TFLOP/s/GPU): ",
                  "| MFU: "):
        assert field in line
    assert out.count("(min, max) time across ranks (ms):") == 2  # one block per log line
    for name in ("forward-backward", "optimizer", "batch-generator", "random-ltd-draw", "forward-compute",
                 "backward-compute"):
        assert f"    {name} ..." in out

    recs = train_records(log)
    assert [r["iteration"] for r in recs] == [2, 4]
    c = resolve_config(parse_args(argv), 98, world_size=1)  # the run's model (padded vocabulary 128) and r_t
    assert c.run.kept_length(0) < c.run.kept_length(3) < 32
    for r in recs:
        seconds = r["elapsed_ms_per_iteration"] / 1000  # the mean over the interval's 2 iterations
        assert r["dense_equivalent_tflops"] * 1e12 * seconds == pytest.approx(iteration_flops(c.model, 4), rel=1e-9)
        its = (r["iteration"] - 2, r["iteration"] - 1)  # 0-based iterations of the interval
        ran = [iteration_flops(c.model, 4, {1, 2}, c.run.kept_length(t)) for t in its]
        assert r["throughput_tflops"] * 1e12 * seconds == pytest.approx(sum(ran) / 2, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["throughput_tflops"] / 0.001)
        assert r["dense_equivalent_mfu"] == pytest.approx(r["dense_equivalent_tflops"] / 0.001)
        assert r["timers_ms"]["forward-backward"][0] > 0

    traces = glob.glob(str(tb / "*.pt.trace.json"))  # iterations 2 and 3, for TensorBoard and Perfetto
    assert len(traces) == 1
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)


def test_compiled_run_resumes_bit_for_bit(tmp_path):
    """6 compiled iterations (dropout and random-LTD mid-ramp on) straight, and 3 + resume + 3: the same
    losses and gradient norms, exactly."""
    base = TINY + LTD + ["--train-iters", "6", "--eval-iters", "0", "--torch-compile"]
    straight, resumed, ck = tmp_path / "a.jsonl", tmp_path / "b.jsonl", str(tmp_path / "ck")
    assert run_inprocess(base + ["--log-json", str(straight)]) == 0
    assert run_inprocess(base + ["--save", ck, "--save-interval", "3", "--exit-interval", "3",
                                 "--log-json", str(resumed)]) == 0
    assert run_inprocess(base + ["--load", ck, "--log-json", str(resumed)]) == 0
    key = lambda path: [(r["iteration"], r["lm_loss"], r["grad_norm"]) for r in train_records(path)]
    assert len(key(straight)) == 6 and key(straight) == key(resumed)


def test_dense_cpu_run_has_throughput_but_no_mfu_without_a_peak(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    assert run_inprocess(TINY + ["--train-iters", "3", "--eval-iters", "0", "--log-json", str(log),
                                 "--log-throughput"]) == 0
    out = capsys.readouterr().out
    assert "| throughput per GPU (TFLOP/s/GPU): " in out
    assert "dense-equivalent" not in out and "MFU" not in out and "time across ranks" not in out
    rec = train_records(log)[-1]
    assert rec["throughput_tflops"] == rec["dense_equivalent_tflops"] > 0
    assert "mfu" not in rec and "timers_ms" not in rec


@pytest.mark.parametrize("flags, needle", [
    (["--timing-log-level", "3"], "invalid choice"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5", "--tensorboard-dir", "tb"],
     "--profile-step-end 5 must be after --profile-step-start 5"),
], ids=["timing-level-3", "profile-end-not-after-start"])
def test_bad_speed_flags_one_line_no_traceback(tmp_path, flags, needle):
    proc = run_subprocess(TINY + ["--train-iters", "2", "--save", str(tmp_path / "ck")] + flags, cwd=str(tmp_path))
    assert_one_error_line(proc, needle)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("flags, message", [
    (["--peak-tflops", "0"], "--peak-tflops must be positive, got 0"),
    (["--profile-step-start", "-1"], "--profile-step-start must be >= 0, got -1"),
    (["--profile"], "--profile writes its trace into --tensorboard-dir"),
    (["--profile", "--tensorboard-dir", "tb", "--profile-ranks", "0", "3"],
     "--profile-ranks 0 3: the ranks of this run are 0..0"),
])
def test_bad_speed_flag_values(flags, message):
    from megatron.core.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_config(parse_args(TINY + ["--train-iters", "3"] + flags), 98, world_size=1)


def test_torch_compile_resolves_to_inductor_layers():
    def model(*flags):
        return resolve_config(parse_args(TINY + ["--train-iters", "3", *flags]), 98, world_size=1).model
    assert model("--torch-compile").torch_compile == "inductor"
    assert model().torch_compile is None
