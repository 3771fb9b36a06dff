"""End-to-end runs of pretrain_gpt_ltd.py on tiny models: learning, logging, exact resume, bad flags."""

import math

import pytest

from tests.functional.gpt_cli import (
    TINY,
    make_pattern_data,
    read_json_lines,
    run_inprocess,
    run_subprocess,
    train_records,
)


def test_tiny_run_learns_and_logs(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    prefix = make_pattern_data(tmp_path)
    argv = [a for a in TINY if a != "--mock-data"] + [
        "--data-path", prefix, "--split", "90,10,0", "--train-iters", "80", "--log-json", str(log),
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--lr", "4e-3"]
    assert run_inprocess(argv) == 0
    out = capsys.readouterr().out
    assert "iteration       80/      80 | consumed samples:          320 |" in out
    assert "validation loss at iteration 80 on validation set" in out
    recs = train_records(log)
    assert [r["iteration"] for r in recs] == list(range(1, 81))
    for key in ("iteration", "consumed_samples", "consumed_tokens", "lr", "lm_loss", "grad_norm",
                "elapsed_ms_per_iteration", "tokens_per_sec"):
        assert key in recs[0]
    assert recs[-1]["consumed_tokens"] == 320 * 32
    assert recs[0]["lr"] == 0.0  # iteration 1 uses the LR at progress 0 (warmup)
    assert recs[1]["lr"] == pytest.approx(2e-3)  # progress 4 of 8 warmup samples
    assert recs[0]["lm_loss"] == pytest.approx(math.log(128), abs=0.3)  # padded vocab 128
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 1.0  # the counting pattern is learnable
    vals = [r for r in read_json_lines(log) if "val_loss" in r]
    assert vals and all(abs(v["val_ppl"] - math.exp(v["val_loss"])) < 1e-6 * v["val_ppl"] for v in vals)


@pytest.mark.parametrize("ltd", [False, True])
def test_resume_is_exact(tmp_path, ltd):
    """N iterations straight == N/2, save, resume, N/2: identical losses (dropout on, LTD mid-ramp)."""
    extra = ["--hidden-dropout", "0.1", "--train-iters", "8", "--save-interval", "4"]
    if ltd:
        extra += ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
                  "--random-ltd-ramp-iters", "6"]
    straight, first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert run_inprocess(TINY + extra + ["--log-json", str(straight), "--save", str(tmp_path / "ck_a")]) == 0
    assert run_inprocess(TINY + extra + ["--log-json", str(first), "--save", str(tmp_path / "ck_b"),
                                         "--exit-interval", "4"]) == 0
    assert run_inprocess(TINY + extra + ["--log-json", str(second), "--save", str(tmp_path / "ck_b"),
                                         "--load", str(tmp_path / "ck_b")]) == 0
    a = train_records(straight)
    b = train_records(first) + train_records(second)
    assert [r["iteration"] for r in b] == list(range(1, 9))
    keys = ["lm_loss", "lr", "grad_norm", "consumed_samples"] + (["ltd_seq_length", "consumed_layer_tokens"] if ltd else [])
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == rb[k], (ra["iteration"], k, ra[k], rb[k])
    val_a = [r["val_loss"] for r in read_json_lines(straight) if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_json_lines(first) + read_json_lines(second) if "val_loss" in r]
    assert val_a == val_b


@pytest.mark.parametrize("flags, needle", [
    (["--global-batch-size", "5"], "not a multiple of --micro-batch-size"),
    (["--hidden-size", "30"], "not divisible by --num-attention-heads"),
    (["--max-position-embeddings", "16"], "longer than the position table"),
    (["--train-iters", "2", "--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_one_line_no_traceback(tmp_path, flags, needle):
    argv = TINY + ["--train-iters", "2"] + flags
    proc = run_subprocess(argv + ["--save", str(tmp_path / "ck")])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ck").exists()
