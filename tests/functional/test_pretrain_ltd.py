"""Training with random-LTD end to end: LayerToken LR, layer-token accounting, budget stop, learning."""

import pytest

from megatron.training.lr_schedule import LRScheduleConfig, lr_at
from tests.functional.gpt_cli import (
    TINY,
    make_pattern_data,
    run_inprocess,
    train_records,
)

LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "10"]
L, S, G = 4, 32, 4


def run(tmp_path, name, extra, base=TINY):
    log = tmp_path / f"{name}.jsonl"
    assert run_inprocess(base + ["--log-json", str(log)] + extra) == 0
    return train_records(log)


def test_layer_token_lr_equals_iteration_lr_without_ltd(tmp_path):
    base = ["--train-iters", "12", "--lr-decay-style", "cosine", "--lr-warmup-iters", "3"]
    a = run(tmp_path, "iter", base)
    b = run(tmp_path, "lt", base + ["--layer-token-lr-schedule"])
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["lm_loss"] for r in a] == [r["lm_loss"] for r in b]


def test_accounting_and_layer_token_lr_follow_the_formulas(tmp_path):
    recs = run(tmp_path, "ltd", LTD + ["--train-iters", "14", "--layer-token-lr-schedule",
                                       "--lr-decay-style", "linear", "--lr-warmup-iters", "2", "--lr", "1e-3",
                                       "--min-lr", "1e-4"])
    n = L - 2  # default LTD set: every layer but the first and last
    consumed = 0
    cfg = LRScheduleConfig(1e-3, 1e-4, "linear", warmup_samples=2 * G, decay_samples=14 * G)
    for t, rec in enumerate(recs):
        r = min(S, 4 * ((8 * 10 + t * (S - 8)) // (10 * 4)))  # MSLG with exact integer arithmetic
        assert rec["ltd_seq_length"] == r
        lr_expected = lr_at(cfg, consumed / (L * S))  # progress before this iteration, dense-equivalent samples
        assert rec["lr"] == pytest.approx(lr_expected, rel=1e-12)
        consumed += G * ((L - n) * S + n * r)
        assert rec["consumed_layer_tokens"] == consumed
        assert rec["layer_token_saving"] == pytest.approx(1 - consumed / (L * S * rec["consumed_samples"]))
    # The dense-equivalent progress lags the sample count, so LayerToken LR has not finished decaying.
    assert recs[-1]["lr"] > 1e-4


def test_train_layer_tokens_stops_at_budget_and_decays_to_it(tmp_path):
    budget = 3000
    recs = run(tmp_path, "budget", LTD + ["--train-layer-tokens", str(budget), "--layer-token-lr-schedule",
                                          "--lr-decay-style", "linear", "--lr-warmup-iters", "0",
                                          "--min-lr", "0"])
    lt = [r["consumed_layer_tokens"] for r in recs]
    assert lt[-1] >= budget > lt[-2]
    # default decay length = the budget in dense-equivalent samples: lr = max * (1 - C_before / budget)
    for before, rec in zip([0] + lt[:-1], recs):
        assert rec["lr"] == pytest.approx(1e-3 * (1 - before / budget), rel=1e-9)


def test_ltd_run_learns_and_evaluates_full_length(tmp_path, capsys):
    prefix = make_pattern_data(tmp_path)
    argv = LTD + [
        "--data-path", prefix, "--split", "90,10,0", "--train-iters", "80", "--lr", "4e-3",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "40", "--eval-iters", "2"]
    recs = run(tmp_path, "learn", argv, base=[a for a in TINY if a != "--mock-data"])
    assert recs[0]["ltd_seq_length"] == 8 and recs[-1]["ltd_seq_length"] == 32
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 1.0
    out = capsys.readouterr().out
    assert "validation loss at iteration 80" in out
