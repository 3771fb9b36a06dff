"""tools/ltd_budget.py: the paper's GPT-3 1.3B plan, the JSON contract, dense equivalence, error exits."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scripts import load_script

TOOL = Path(__file__).resolve().parents[2] / "tools" / "ltd_budget.py"
ltd_budget = load_script("tools/ltd_budget.py")

MODEL = ["--num-layers", "24", "--seq-length", "2048", "--global-batch-size", "512"]
LTD = ["--random-ltd", "--random-ltd-start-seq-length", "128", "--random-ltd-seq-step", "16",
       "--random-ltd-ramp-iters", "200000", "--random-ltd-layers", "1-22"]
KEYS = {"iterations", "raw_tokens", "layer_tokens", "dense_layer_tokens", "saving", "full_length_iteration"}


def run_json(capsys, *argv):
    assert ltd_budget.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_gpt3_1_3b_budget(capsys):
    start = time.perf_counter()
    plan = run_json(capsys, *MODEL, *LTD, "--train-layer-tokens", "4800e9", "--baseline-train-tokens", "300e9")
    assert time.perf_counter() - start < 0.5
    assert set(plan) == KEYS | {"baseline_layer_tokens", "baseline_saving"}
    assert 277_000 <= plan["iterations"] <= 278_000  # reference ~277.5k
    assert 290e9 <= plan["raw_tokens"] <= 292e9  # reference ~291B
    assert plan["raw_tokens"] == plan["iterations"] * 512 * 2048
    assert 4800e9 <= plan["layer_tokens"] < 4800.1e9
    assert plan["baseline_layer_tokens"] == 7200 * 10**9
    assert plan["baseline_saving"] == pytest.approx(1 / 3, abs=1e-4)  # the paper's 33.3%
    assert plan["dense_layer_tokens"] == 24 * plan["raw_tokens"]
    assert plan["saving"] == pytest.approx(1 - plan["layer_tokens"] / plan["dense_layer_tokens"])
    assert plan["full_length_iteration"] == 200_001


def test_default_layers_and_flags_match_explicit_recipe(capsys):
    explicit = run_json(capsys, *MODEL, *LTD, "--train-iters", "250000")
    defaults = run_json(capsys, *MODEL, "--random-ltd", "--random-ltd-ramp-iters", "200000", "--train-iters", "250000")
    assert explicit == defaults


def test_dense_equivalence_without_random_ltd(capsys):
    for length in (["--train-iters", "1000"], ["--train-tokens", "300e9"], ["--train-layer-tokens", "4800e9"]):
        plan = run_json(capsys, *MODEL, *LTD[1:], *length)  # every LTD flag but --random-ltd: ignored
        assert set(plan) == KEYS
        assert plan["layer_tokens"] == plan["dense_layer_tokens"] == 24 * 2048 * 512 * plan["iterations"]
        assert plan["saving"] == 0.0 and plan["full_length_iteration"] == 1
    assert run_json(capsys, *MODEL, "--train-tokens", "300e9")["iterations"] == 286_103


def test_lengths_agree(capsys):
    by_iters = run_json(capsys, *MODEL, *LTD, "--train-iters", "1000")
    assert run_json(capsys, *MODEL, *LTD, "--train-samples", "512000") == by_iters
    assert run_json(capsys, *MODEL, *LTD, "--train-tokens", str(1000 * 512 * 2048)) == by_iters
    assert run_json(capsys, *MODEL, *LTD, "--train-layer-tokens", str(by_iters["layer_tokens"])) == by_iters
    assert by_iters["full_length_iteration"] == 200_001 > by_iters["iterations"]


def test_ramp_fraction_of_training_iterations(capsys):
    frac = run_json(capsys, *MODEL, "--random-ltd", "--random-ltd-ramp-fraction", "0.7", "--train-iters", "1000")
    iters = run_json(capsys, *MODEL, "--random-ltd", "--random-ltd-ramp-iters", "700", "--train-iters", "1000")
    assert frac == iters and frac["full_length_iteration"] == 701


def test_text_output(capsys):
    assert ltd_budget.main([*MODEL, *LTD, "--train-layer-tokens", "4800e9", "--baseline-train-tokens", "300e9"]) == 0
    text = capsys.readouterr().out
    for needle in ("iterations:", "277,389", "raw tokens read:", "290.9B", "layer-tokens:", "dense layer-tokens:",
                   "theoretical saving:", "full length at iteration:  200,001", "saving vs baseline:        33.33%"):
        assert needle in text, needle


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*MODEL, "--train-iters", "10", "--bogus"], "unrecognized arguments"),
        (MODEL, "one of the arguments"),
        ([*MODEL, "--train-iters", "10", "--train-tokens", "5"], "not allowed with"),
        ([*MODEL, "--train-iters", "1.5"], "not a whole number"),
        ([*MODEL, "--train-iters", "abc"], "not a number"),
        ([*MODEL, "--random-ltd", "--train-iters", "10"], "--random-ltd-ramp-iters"),
        ([*MODEL, *LTD[:-2], "--random-ltd-layers", "1-24", "--train-iters", "10"], "out of range"),
        ([*MODEL, *LTD, "--random-ltd-start-seq-length", "4096", "--train-iters", "10"], "larger than --seq-length"),
        ([*MODEL, *LTD, "--random-ltd-start-seq-length", "8", "--train-iters", "10"], "smaller than"),
        ([*MODEL, *LTD, "--random-ltd-seq-step", "0", "--train-iters", "10"], "--random-ltd-seq-step"),
        ([*MODEL, "--random-ltd", "--random-ltd-ramp-iters", "0", "--train-iters", "10"], "--random-ltd-ramp-iters"),
        ([*MODEL, "--random-ltd", "--random-ltd-ramp-fraction", "0.7", "--train-layer-tokens", "4800e9"],
         "--random-ltd-ramp-iters instead"),
        ([*MODEL, "--random-ltd", "--random-ltd-ramp-fraction", "1.5", "--train-iters", "10"], "(0, 1]"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, argv, message):
    assert ltd_budget.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_cli_subprocess_exit_codes():
    ok = subprocess.run([sys.executable, str(TOOL), *MODEL, *LTD, "--train-iters", "10", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and set(json.loads(ok.stdout)) == KEYS
    bad = subprocess.run([sys.executable, str(TOOL), *MODEL, "--train-iters", "10", "--random-ltd-layers", "x",
                          "--random-ltd", "--random-ltd-ramp-iters", "5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --random-ltd-layers")
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
