"""Training with random-LTD end to end: LayerToken LR, layer-token accounting, budget stop, learning,
resume mid-ramp, and LTD flags checked at parse time."""

import math

import pytest

from megatron.training.arguments import build_parser
from megatron.training.config import resolve_config, run_length_from_flags
from tests.functional.gpt_cli import (
    TINY,
    make_pattern_data,
    run_inprocess,
    train_records,
)

LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "10"]
L, S, G = 4, 32, 4
N_LTD = L - 2  # default LTD set: every layer but the first and last


def run(tmp_path, name, extra, base=TINY):
    log = tmp_path / f"{name}.jsonl"
    assert run_inprocess(base + ["--log-json", str(log)] + extra) == 0
    return train_records(log)


def mslg(t):
    """r_t for LTD above: r_0 = 8, q = 4, T_r = 10, s = 32, in exact integer arithmetic."""
    return min(S, 4 * ((8 * 10 + t * (S - 8)) // (10 * 4)))


def layer_tokens(t):
    return G * ((L - N_LTD) * S + N_LTD * mslg(t))  # LT_t


def test_layer_token_lr_equals_iteration_lr_without_ltd(tmp_path):
    base = ["--train-iters", "12", "--lr-decay-style", "cosine", "--lr-warmup-iters", "3"]
    a = run(tmp_path, "iter", base)
    b = run(tmp_path, "lt", base + ["--layer-token-lr-schedule"])
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["lm_loss"] for r in a] == [r["lm_loss"] for r in b]


def test_accounting_and_layer_token_lr_follow_the_formulas(tmp_path):
    """Cosine LayerToken LR with a warmup of 256 tokens, written out in layer-tokens: the warmup ends once
    C = 256 * L layer-tokens are consumed, the decay once the dense run's 14 * G * s * L are."""
    lr_max, lr_min = 1e-3, 1e-4
    recs = run(tmp_path, "ltd", LTD + ["--train-iters", "14", "--layer-token-lr-schedule", "--lr-decay-style",
                                       "cosine", "--lr-warmup-iters", "0", "--lr-warmup-tokens", "256",
                                       "--lr", str(lr_max), "--min-lr", str(lr_min)])
    warmup_lt, decay_lt = 256 * L, 14 * G * S * L
    consumed = 0  # layer-tokens before this iteration
    for t, rec in enumerate(recs):
        assert rec["kept_length"] == mslg(t)
        if consumed <= warmup_lt:
            lr_expected = lr_max * consumed / warmup_lt
        else:
            rho = (consumed - warmup_lt) / (decay_lt - warmup_lt)
            lr_expected = lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * rho))
        assert rec["lr"] == pytest.approx(lr_expected, rel=1e-12), t
        consumed += layer_tokens(t)
        assert rec["consumed_layer_tokens"] == consumed
        assert rec["layer_token_saving"] == pytest.approx(1 - consumed / (L * S * rec["consumed_samples"]))
    # still warming up at iteration 4 (992 of 1024 layer-tokens consumed before it), where a dense run's
    # 512 per iteration would have finished after 2 iterations
    assert recs[3]["lr"] == pytest.approx(lr_max * 992 / 1024, rel=1e-12)
    # The dense-equivalent progress lags the sample count, so LayerToken LR has not finished decaying.
    assert recs[-1]["lr"] > lr_min


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


def test_layer_token_budget_with_plain_lr_schedule_decays_over_the_iterations(tmp_path):
    """Without --layer-token-lr-schedule progress counts samples read, so the default decay length is the
    N * G samples the budget's N iterations read (budget / (L*s) would reach --min-lr early)."""
    budget, lr_max, lr_min = 3000, 1e-3, 1e-4
    recs = run(tmp_path, "plain", LTD + ["--train-layer-tokens", str(budget), "--lr-decay-style", "cosine",
                                         "--lr-warmup-iters", "0", "--lr", str(lr_max), "--min-lr", str(lr_min)])
    n, consumed = 0, 0
    while consumed < budget:  # iterations to the budget, from the formula
        consumed, n = consumed + layer_tokens(n), n + 1
    assert len(recs) == n and budget / (L * S) < 0.8 * n * G  # the wrong length would be visibly shorter
    for t, rec in enumerate(recs):  # cosine over samples t * G of n * G
        assert rec["lr"] == pytest.approx(lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * t / n)),
                                          rel=1e-12), t
    assert all(r["lr"] > lr_min for r in recs), "min-lr is reached after the last iteration, not before"


def test_resume_mid_ramp_with_layer_token_lr_and_budget_is_exact(tmp_path):
    """Straight to the budget == half, save, resume, rest: same losses, LR, counters and stop iteration."""
    extra = LTD + ["--hidden-dropout", "0.1", "--train-layer-tokens", "3000", "--layer-token-lr-schedule",
                   "--lr-decay-style", "cosine", "--lr-warmup-tokens", "128", "--lr-warmup-iters", "0",
                   "--save-interval", "100"]
    a = run(tmp_path, "a", extra + ["--save", str(tmp_path / "ck_a")])
    first = run(tmp_path, "b1", extra + ["--save", str(tmp_path / "ck_b"), "--exit-interval", "4"])
    second = run(tmp_path, "b2", extra + ["--save", str(tmp_path / "ck_b"), "--load", str(tmp_path / "ck_b")])
    assert len(first) == 4 and first[-1]["consumed_layer_tokens"] < 3000 and first[-1]["kept_length"] < S
    b = first + second
    assert [r["iteration"] for r in b] == [r["iteration"] for r in a] == list(range(1, len(a) + 1))
    for ra, rb in zip(a, b):
        for k in ("lm_loss", "lr", "grad_norm", "consumed_samples", "kept_length", "consumed_layer_tokens"):
            assert ra[k] == rb[k], (ra["iteration"], k, ra[k], rb[k])
    assert b[-1]["consumed_layer_tokens"] >= 3000 > b[-2]["consumed_layer_tokens"]


@pytest.mark.parametrize("flags, needle", [
    (["--random-ltd-start-seq-length", "64"], "larger than --seq-length 32"),
    (["--random-ltd-layers", "1-4"], "out of range for --num-layers 4"),
    (["--random-ltd-ramp-iters", "0"], "--random-ltd-ramp-iters 0 must be at least 1"),
])
def test_bad_ltd_flags_fail_before_anything_is_built(tmp_path, capsys, flags, needle):
    argv = TINY + LTD + ["--train-iters", "3", "--save", str(tmp_path / "ck")] + flags
    assert run_inprocess(argv) == 2
    out, err = capsys.readouterr()
    assert out == "", "no banner, no model: the error comes from argument validation"
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "ck").exists()


def test_ltd_flags_without_random_ltd_warn_once(tmp_path, capsys, monkeypatch):
    recs = run(tmp_path, "dense", ["--train-iters", "3", "--random-ltd-ramp-iters", "5",
                                   "--random-ltd-layers", "1-2"])
    assert [r["kept_length"] for r in recs] == [S, S, S]  # trained dense, as the warning says
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "WARNING" in line] == [
        "WARNING: --random-ltd-ramp-iters, --random-ltd-layers ignored: random-LTD is off "
        "(add --random-ltd to drop tokens)"]
    flags = build_parser().parse_args(TINY + ["--train-iters", "3", "--random-ltd-seq-step", "8"])
    monkeypatch.setenv("RANK", "1")
    config = resolve_config(flags, 97, world_size=1)  # only rank 0 warns
    assert capsys.readouterr().err == "" and config.args["random_ltd_seq_step"] == 8
    assert config.args["random_ltd_start_seq_length"] == 128, "defaults filled in (in the saved args)"


def test_pipeline_stages_draw_only_their_own_ltd_layers():
    args = build_parser().parse_args(["--num-layers", "24", "--hidden-size", "8", "--num-attention-heads", "1",
                                      "--seq-length", "2048", "--micro-batch-size", "1", "--global-batch-size", "1",
                                      "--lr", "1",
                                      "--train-iters", "10", "--random-ltd", "--random-ltd-ramp-iters", "5"])
    run_length = run_length_from_flags(args, 1)
    stages = [run_length.stage_ltd_layers(6 * k, 6) for k in range(4)]  # 4 stages of 6 layers
    assert stages[0] == frozenset(range(1, 6)) and stages[3] == frozenset(range(18, 23))
    assert frozenset().union(*stages) == run_length.ltd_layers == frozenset(range(1, 23))


def test_ltd_run_learns_and_evaluates_full_length(tmp_path, capsys):
    prefix = make_pattern_data(tmp_path)
    argv = LTD + [
        "--data-path", prefix, "--split", "90,10,0", "--train-iters", "80", "--lr", "4e-3",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "40", "--eval-iters", "2"]
    recs = run(tmp_path, "learn", argv, base=[a for a in TINY if a != "--mock-data"])
    assert recs[0]["kept_length"] == 8 and recs[-1]["kept_length"] == 32
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 1.0
    out = capsys.readouterr().out
    assert "validation loss at iteration 80" in out
